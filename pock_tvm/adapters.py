"""LoRA adapters on an imported model: the scheme's ``lora`` table made into parameters and ops."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .frontend.model import ImportedModel, ParamInfo
from .passes.add_lora import Adapter, AddLoRA
from .scheme import LoRA, blocks, select_params, trainable_params


def add_lora(imported: ImportedModel, lora: LoRA) -> ImportedModel:
    """``imported`` with adapters beside every linear weight ``lora.select`` picks; they are named
    ``<layer>.lora_A.weight`` and ``<layer>.lora_B.weight`` (PEFT's names without its adapter name)
    and start as PEFT's do: ``A`` uniform in +-1/sqrt(in), ``B`` zero."""
    params, kinds, _ = trainable_params(imported)
    chosen = [p for p in select_params(lora.select, params, blocks(imported), kinds) if kinds[p.name] == "linear"]
    if not chosen:
        raise ValueError(f"LoRA: select {lora.select!r} matches no linear weight; use a glob over linear layers "
                         "or @role:attention / @role:mlp")
    rng = np.random.default_rng(lora.seed)
    adapters, added = {}, []
    for p in chosen:
        out_f, in_f = p.value.shape
        bound = 1.0 / math.sqrt(in_f)
        a = rng.uniform(-bound, bound, (lora.rank, in_f)).astype(p.value.dtype)
        b = np.zeros((out_f, lora.rank), p.value.dtype)
        adapter = Adapter(p.var_name + "_lora_A", p.var_name + "_lora_B", lora.rank, lora.scale)
        adapters[p.var_name] = adapter
        added += [ParamInfo(f"{p.layer}.lora_A.weight", adapter.a, a, adapter=True),
                  ParamInfo(f"{p.layer}.lora_B.weight", adapter.b, b, adapter=True)]
    return replace(imported, mod=AddLoRA(adapters)(imported.mod), params=imported.params + added)


def merge_lora(state: dict[str, np.ndarray], lora: LoRA) -> dict[str, np.ndarray]:
    """A state dict with every adapter folded into its weight (``W + scale * B @ A``), adapters
    removed: the fine-tuned model in the original architecture, for ``load_state_dict`` in torch."""
    merged = {k: v for k, v in state.items() if not k.endswith((".lora_A.weight", ".lora_B.weight"))}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            layer = key[: -len(".lora_A.weight")]
            merged[layer + ".weight"] = merged[layer + ".weight"] + lora.scale * (state[layer + ".lora_B.weight"] @ a)
    return merged
