"""A fine-tuned step's parameters as a Hugging Face model or a PEFT adapter."""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..runtime.files import replace_dir, sibling
from ..runtime.program import Program
from .state import ADAPTER_SUFFIXES, fine_tuned_state, lora_of


def _prefix(state: dict, own: list[str]) -> str:
    """What the program's names put before the Hugging Face model's own (``lm.`` for
    :class:`~pock_tvm.models.hf.CausalLMLogits`): the step was compiled from a wrapper of it. The
    prefix under which most of the model's names are found; at least three quarters of them must be
    (a tied output embedding is one tensor in the step)."""
    counts: dict[str, int] = {}
    for key in state:
        for name in own:
            if key == name or key.endswith("." + name):
                counts[key[: len(key) - len(name)]] = counts.get(key[: len(key) - len(name)], 0) + 1
    best = max(counts, key=counts.get, default=None)
    if best is None or 4 * counts[best] < 3 * len(own):
        raise ValueError("the program's parameters match none of the Hugging Face model's: pass the model the "
                         "step was compiled from (the one inside CausalLMLogits / EncoderClassifier)")
    return best


def _merged_into(name: str) -> str:
    """The weight an adapter tensor was merged into (``layer.lora_A.weight`` -> ``layer.weight``);
    any other name itself."""
    suffix = next((s for s in ADAPTER_SUFFIXES if name.endswith(s)), None)
    return name[: -len(suffix)] + ".weight" if suffix else name


def hf_state_dict(program: Program, hf_model) -> dict[str, np.ndarray]:
    """The program's parameters (:func:`~.state.fine_tuned_state`: LoRA merged, finite) under
    ``hf_model``'s own names. A trained tensor that is not part of ``hf_model`` (a classifier head
    outside the encoder) is an error that names it."""
    state = fine_tuned_state(program)
    own = list(hf_model.state_dict())
    prefix = _prefix(state, own)
    mapped = {name: state[prefix + name] for name in own if prefix + name in state}
    trained = {_merged_into(p.source) for p in program.layout.trainable}
    outside = sorted(t for t in trained if not t.startswith(prefix) or t[len(prefix):] not in mapped)
    if outside:
        raise ValueError(f"trained tensors {outside[:4]} are not part of the Hugging Face model: save them "
                         "separately (program.state_dict()) or export the whole step (pock-tvm export)")
    return mapped


def save_pretrained(program: Program, hf_model, path: str | Path, force: bool = False) -> Path:
    """``hf_model`` (the ``transformers`` model the step was compiled from; left unchanged) with the
    fine-tuned parameters (LoRA merged), written by its own ``save_pretrained`` (safetensors) to
    directory ``path`` atomically; ``from_pretrained(path)`` loads the fine-tuned model."""
    import torch

    model = copy.deepcopy(hf_model)
    state = hf_state_dict(program, model)
    tensors = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for name, value in state.items():
            tensors[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return _write_dir(Path(path), force, lambda tmp: model.save_pretrained(tmp, safe_serialization=True))


def save_peft_adapter(program: Program, hf_model, path: str | Path, force: bool = False) -> Path:
    """The LoRA adapters the step trained as a PEFT adapter directory (``adapter_config.json``,
    ``adapter_model.safetensors``): ``peft.PeftModel.from_pretrained(hf_model, path)`` gives the
    fine-tuned model. Only for a scheme that trains adapters and nothing else."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    lora = lora_of(program)
    if lora is None:
        raise ValueError("the step trains no LoRA adapters: use save_pretrained (the whole fine-tuned model)")
    state = program.state_dict()
    others = sorted(p.source for p in program.layout.trainable if not p.source.endswith(ADAPTER_SUFFIXES))
    if others:
        raise ValueError(f"the step also trains {others[:4]}, which a LoRA adapter cannot hold: use "
                         "save_pretrained (the merged model)")
    prefix = _prefix({k: v for k, v in state.items() if not k.endswith(ADAPTER_SUFFIXES)}, list(hf_model.state_dict()))
    adapters = {k[len(prefix):]: v for k, v in state.items() if k.endswith(ADAPTER_SUFFIXES)}
    bad = sorted(k for k, v in adapters.items() if not np.all(np.isfinite(v)))
    if bad:
        raise ValueError(f"refusing to save non-finite adapters: {bad[:4]} (a diverged fine-tune)")
    targets = sorted({k[: -len(s)] for k in adapters for s in ADAPTER_SUFFIXES if k.endswith(s)})
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    peft_model = get_peft_model(copy.deepcopy(hf_model), config)
    result = set_peft_model_state_dict(peft_model, {f"base_model.model.{k}": torch.from_numpy(np.ascontiguousarray(v))
                                                    for k, v in adapters.items()})
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"PEFT did not take the adapters {unexpected[:4]}")
    return _write_dir(Path(path), force, lambda tmp: peft_model.save_pretrained(tmp, safe_serialization=True))


def _write_dir(path: Path, force: bool, write) -> Path:
    """``write(tmp)`` into a new directory beside ``path``, then swapped in for ``path``
    (``runtime.files.replace_dir``); an existing ``path`` must be empty, a previous save, or ``force``."""
    if path.exists() and any(path.iterdir()) and not force and not (path / "config.json").exists() \
            and not (path / "adapter_config.json").exists():
        raise ValueError(f"'{path}' exists and is not a saved model; choose a new directory or pass force=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=sibling(path, "tmp"), dir=path.parent))
    try:
        write(tmp)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
