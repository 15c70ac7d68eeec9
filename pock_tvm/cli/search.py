"""``pock-tvm search``: the scheme search of :mod:`pock_tvm.search.scheme_search` on a data file,
written as a scheme file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..calling import IGNORE_INDEX
from ..search import AnalysisSettings
from ..search.scheme_search import SearchResult, parse_ms, parse_size, progress_bar, search_scheme


def search_command(model: str, data: str, budget: str, output: str, latency: str | None = None,
                   input_shape=None, seed: int = 0, epochs: int | None = None, cache_dir: str | None = None,
                   target: str = "host", loss: str = "cross_entropy", lr: float | None = None,
                   batch: int | None = None, samples: int | None = None, last_blocks: int | None = None,
                   time_budget: str | None = None, lora_ranks: str | None = None,
                   metric: str | None = None) -> SearchResult:
    """``pock-tvm search MODEL --data D.npz --budget 2MB [--latency 30ms] -o scheme.toml``.

    ``D.npz`` holds ``x`` and ``y`` (samples and labels), or token data: ``input_ids`` with
    ``attention_mask`` (optional, all ones) and ``labels`` (for ``--loss next_token`` optional: the
    ids, padding not counted; for a classifier the class of each sequence), compiled at ``batch``
    sequences per step."""
    import torch

    from ..cache import cache_dir as default_cache
    from ..frontend import import_model
    from ..optim import Adam
    from ..runtime.files import atomic_file, writable_file
    from .commands import load_model

    size, (ms, latency_of) = parse_size(budget), _latency(latency)
    seconds = parse_ms(time_budget, "time budget") / 1e3 if time_budget is not None else None
    ranks = _ranks(lora_ranks)
    writable_file(output, "search -o")  # before minutes of analysis, not after
    if not Path(data).exists():
        raise ValueError(f"search: no such data file '{data}'")
    with np.load(data) as arrays:
        x, y = _arrays(dict(arrays), data, loss)
    if isinstance(x, tuple):  # token data: the model takes (ids, mask) at the data's sequence length
        batch = batch or 1
        model_obj, _ = load_model(model, input_shape or (batch, x[0].shape[1]))
        example = tuple(torch.from_numpy(a[:batch]) for a in x)
    else:
        model_obj, example = load_model(model, input_shape)
        if example is None:
            raise ValueError("search: ONNX models are not supported by search yet; give a torch model")
        if tuple(x.shape[1:]) != tuple(example[0].shape[1:]):
            raise ValueError(f"search: data samples have shape {tuple(x.shape[1:])}, the model takes "
                             f"{tuple(example[0].shape[1:])}; give --input-shape or reshape the data")
        batch = int(example[0].shape[0])
    settings = AnalysisSettings(seed=seed, loss=loss, samples=samples, last_blocks=last_blocks,
                                time_budget_s=seconds, lora_ranks=ranks, metric=metric,
                                **({} if epochs is None else {"epochs": epochs}),
                                **({} if lr is None else {"optimizer": Adam(lr=lr)}))
    result = search_scheme(import_model(model_obj, example), x, y, batch=batch, budget=size,
                           latency_ms=ms, latency_of=latency_of, seed=seed, settings=settings, progress=progress_bar(),
                           cache_dir=cache_dir or default_cache() / "search", target=target)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        f.write(result.scheme.to_toml().encode())
    return result


def _latency(text: str | None):
    """``--latency``: a time on this machine (``30ms``) or a scheme whose step the chosen one may not
    exceed (a preset such as ``lora``, or a scheme file): ``(ms, scheme)``, one of them None."""
    from ..scheme import Scheme

    if text is None:
        return None, None
    try:
        return parse_ms(text), None
    except ValueError:
        pass
    try:
        return None, Scheme.load(text)
    except ValueError as err:
        raise ValueError(f"search: --latency {text!r} is neither a time (30ms, 0.5s) nor a scheme to be no slower "
                         f"than (a preset such as lora, or a .toml file): {err}") from None


def _arrays(arrays: dict, data: str, loss: str):
    """``(x, y)`` from a data file: ``x`` an array, or ``(input_ids, attention_mask)``."""
    if "input_ids" in arrays:
        ids = arrays["input_ids"].astype("int64")
        if ids.ndim != 2:
            raise ValueError(f"search: 'input_ids' in '{data}' must be (sequences, length), got {ids.shape}")
        mask = arrays.get("attention_mask", np.ones_like(ids)).astype("int64")
        if mask.shape != ids.shape:
            raise ValueError(f"search: 'attention_mask' in '{data}' has shape {mask.shape}, 'input_ids' {ids.shape}")
        if "labels" in arrays:
            labels = arrays["labels"].astype("int64")
        elif loss == "next_token":
            labels = np.where(mask > 0, ids, IGNORE_INDEX)
        else:
            raise ValueError(f"search: '{data}' has token data but no 'labels' (the class of each sequence); "
                             "add them, or use --loss next_token for a causal LM")
        return (ids, mask), labels
    if "x" not in arrays or "y" not in arrays:
        raise ValueError(f"search: data file '{data}' needs arrays 'x' (inputs) and 'y' (labels), or "
                         f"'input_ids' (token data); it has {sorted(arrays)}")
    if loss == "next_token":
        raise ValueError(f"search: --loss next_token needs token data ('input_ids' in '{data}')")
    return arrays["x"].astype("float32"), arrays["y"].astype("int64")


def _ranks(text: str | None) -> tuple[int, ...] | None:
    """``"4,8"`` -> ``(4, 8)``; ``"none"`` -> ``()``; ``None`` -> the default ranks."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    try:
        ranks = tuple(int(part) for part in text.split(","))
    except ValueError:
        ranks = ()
    if not ranks or min(ranks) < 1:
        raise ValueError(f"search: --lora-ranks {text!r} is not a list of ranks; write e.g. 4,8,16 or none")
    return ranks
