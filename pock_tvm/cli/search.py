"""``pock-tvm search``: the scheme search of :mod:`pock_tvm.search.scheme_search` on a data file,
written as a scheme file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..search import AnalysisSettings
from ..search.scheme_search import SearchResult, parse_ms, parse_size, progress_bar, search_scheme


def search_command(model: str, data: str, budget: str, output: str, latency: str | None = None,
                   input_shape=None, seed: int = 0, epochs: int | None = None, cache_dir: str | None = None,
                   target: str = "host") -> SearchResult:
    """``pock-tvm search MODEL --data D.npz --budget 2MB [--latency 30ms] -o scheme.toml``."""
    from ..frontend import import_model
    from ..runtime.files import atomic_file, writable_file
    from ..cache import cache_dir as default_cache
    from .commands import load_model

    size, ms = parse_size(budget), parse_ms(latency) if latency is not None else None
    writable_file(output, "search -o")  # before minutes of analysis, not after
    model_obj, example = load_model(model, input_shape)
    if example is None:
        raise ValueError("search: ONNX models are not supported by search yet; give a torch model")
    if not Path(data).exists():
        raise ValueError(f"search: no such data file '{data}'")
    with np.load(data) as arrays:
        if "x" not in arrays.files or "y" not in arrays.files:
            raise ValueError(f"search: data file '{data}' needs arrays 'x' (inputs) and 'y' (labels); it has "
                             f"{sorted(arrays.files)}")
        x, y = arrays["x"].astype("float32"), arrays["y"].astype("int64")
    if tuple(x.shape[1:]) != tuple(example[0].shape[1:]):
        raise ValueError(f"search: data samples have shape {tuple(x.shape[1:])}, the model takes "
                         f"{tuple(example[0].shape[1:])}; give --input-shape or reshape the data")
    settings = AnalysisSettings(seed=seed) if epochs is None else AnalysisSettings(epochs=epochs, seed=seed)
    result = search_scheme(import_model(model_obj, example), x, y, batch=int(example[0].shape[0]), budget=size,
                           latency_ms=ms, seed=seed, settings=settings, progress=progress_bar(),
                           cache_dir=cache_dir or default_cache() / "search", target=target)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        f.write(result.scheme.to_toml().encode())
    return result
