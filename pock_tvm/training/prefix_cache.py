"""Cached activations of a frozen prefix: computed once per sample, read back every epoch.

A program compiled with ``prefix_cache=True`` has a ``prefix`` function (inputs -> the frozen
activations the trained layers read) and a ``train_step_cached`` that starts from them. When the
data are fixed (no augmentation), a fine-tune of many epochs then runs the frozen layers once per
sample. The activations are stored per sample in float32 (exact), float16 or int8 (symmetric,
one scale per row of the last axis); the two smaller ones change the numbers the trained layers
see by their rounding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

STORAGE = ("float32", "float16", "int8")
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass
class PrefixCache:
    """Per-sample activations: ``tensors[i]`` has shape ``(samples, *per-sample shape of cached
    tensor i)``; ``scales[i]`` the int8 scales (None otherwise); ``batch_shapes[i]`` the shape the
    compiled step takes for one batch."""

    storage: str
    tensors: list[np.ndarray]
    scales: list[np.ndarray | None]
    batch_shapes: list[tuple[int, ...]]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Host memory the cache holds (activations and scales)."""
        return sum(t.nbytes for t in self.tensors) + sum(s.nbytes for s in self.scales if s is not None)

    def batch(self, rows: np.ndarray) -> list[np.ndarray]:
        """The float32 activations of samples ``rows``, in the shapes the compiled step takes."""
        out = []
        for tensor, scale, shape in zip(self.tensors, self.scales, self.batch_shapes):
            picked = tensor[rows]
            if scale is not None:
                picked = picked.astype(np.float32) * scale[rows][..., None]
            out.append(np.ascontiguousarray(picked, dtype=np.float32).reshape(shape))
        return out


def build_cache(program, xs: tuple[np.ndarray, ...], storage: str = "float32") -> PrefixCache:
    """Run ``program.prefix`` over every sample of ``xs`` (batches of the compiled size, the last
    one padded by repeating its last row) and keep each sample's activations in ``storage``."""
    if storage not in STORAGE:
        raise ValueError(f"prefix cache: storage {storage!r} is not one of {', '.join(STORAGE)}")
    specs = program.layout.cached()
    batch = int(program.layout.inputs[0].shape[0])
    count = len(xs[0])
    start = time.perf_counter()
    if batch > 1:
        _check_batch_major(program, xs, batch)
    per_sample = [(s.shape[0] // batch, *s.shape[1:]) for s in specs]
    tensors = [np.empty((count, *shape), dtype=np.float32 if storage == "float32" else
                        np.float16 if storage == "float16" else np.int8) for shape in per_sample]
    scales = [np.empty((count, *shape[:-1]), np.float32) if storage == "int8" else None for shape in per_sample]
    for i in range(0, count, batch):
        rows = np.arange(i, min(i + batch, count))
        padded = np.concatenate([rows, np.repeat(rows[-1:], batch - len(rows))])
        outs = program.prefix(*(a[padded] for a in xs))
        for k, (value, shape) in enumerate(zip(outs, per_sample)):
            value = value.reshape(batch, *shape)[:len(rows)]
            if not np.all(np.isfinite(value)):
                raise ValueError(f"prefix cache: the frozen prefix computed a non-finite activation for sample "
                                 f"{i + int(np.flatnonzero(~np.isfinite(value).reshape(len(rows), -1).all(1))[0])}; "
                                 "check the inputs (and the model without a cache)")
            _store(storage, value, tensors[k], scales[k], rows)
    cache = PrefixCache(storage, tensors, scales, [s.shape for s in specs], time.perf_counter() - start)
    return cache


def _store(storage: str, value: np.ndarray, tensor: np.ndarray, scale: np.ndarray | None, rows: np.ndarray) -> None:
    if storage == "float32":
        tensor[rows] = value
    elif storage == "float16":
        big = float(np.abs(value).max()) if value.size else 0.0
        if big > _FP16_MAX:
            raise ValueError(f"prefix cache: an activation of {big:.4g} does not fit float16 (largest "
                             f"{_FP16_MAX:.0f}); cache in float32 or int8")
        tensor[rows] = value.astype(np.float16)
    else:
        peak = np.abs(value).max(axis=-1)
        s = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        tensor[rows] = np.clip(np.rint(value / s[..., None]), -127, 127).astype(np.int8)
        scale[rows] = s


def _check_batch_major(program, xs, batch: int) -> None:
    """Each sample's activations must not depend on the other samples of its batch and must lie
    in its own slice of the first axis (the compiler checked only the shapes): the prefix of a
    batch in reverse order must give the same slices, reversed."""
    rows = np.arange(min(batch, len(xs[0])))
    rows = np.concatenate([rows, np.repeat(rows[-1:], batch - len(rows))])
    forward = program.prefix(*(a[rows] for a in xs))
    backward = program.prefix(*(a[rows[::-1]] for a in xs))
    for k, (f, b) in enumerate(zip(forward, backward)):
        f = f.reshape(batch, -1)
        b = b.reshape(batch, -1)[::-1]
        if not np.allclose(f, b, rtol=1e-4, atol=1e-5 * (1 + float(np.abs(f).max()))):
            raise ValueError(f"prefix cache: cached activation {k} of shape {program.layout.cached()[k].shape} "
                             "mixes the samples of a batch (a batch statistic in the frozen layers?), so it "
                             "cannot be cached per sample; fine-tune without prefix_cache")
