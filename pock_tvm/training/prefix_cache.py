"""Cached activations of a frozen prefix: computed once per sample, read back every epoch.

A program compiled with ``prefix_cache=True`` has a ``prefix`` function (inputs -> the frozen
activations the trained layers read) and a ``train_step_cached`` that starts from them. When the
data are fixed (no augmentation), a fine-tune of many epochs then runs the frozen layers once per
sample. The activations are stored per sample in float32 (exact), float16 or int8 (symmetric,
one scale per row of the last axis); the two smaller ones change the numbers the trained layers
see by their rounding. A cached tensor holding infinities (an attention mask's -inf) is kept in
float32 by int8 storage (a scale cannot represent it) and in float16 (which has infinities) by
float16 storage.
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
    tensors: list = [None] * len(specs)
    scales: list = [None] * len(specs)
    for i in range(0, count, batch):
        rows = np.arange(i, min(i + batch, count))
        padded = np.concatenate([rows, np.repeat(rows[-1:], batch - len(rows))])
        outs = program.prefix(*(a[padded] for a in xs))
        for k, (value, shape) in enumerate(zip(outs, per_sample)):
            value = value.reshape(batch, *shape)[:len(rows)]
            if np.isnan(value).any():
                sample = i + int(np.flatnonzero(np.isnan(value).reshape(len(rows), -1).any(1))[0])
                raise ValueError(f"prefix cache: the frozen prefix computed NaN for sample {sample}; check the "
                                 "inputs (and the model without a cache)")
            if tensors[k] is None:  # the first batch decides each tensor's storage
                kind = storage if storage != "int8" or np.isfinite(value).all() else "float32"
                tensors[k] = np.empty((count, *shape), dtype=kind)
                scales[k] = np.empty((count, *shape[:-1]), np.float32) if kind == "int8" else None
            _store(str(tensors[k].dtype), value, tensors[k], scales[k], rows)
    cache = PrefixCache(storage, tensors, scales, [s.shape for s in specs], time.perf_counter() - start)
    kept = [k for k, t in enumerate(tensors) if storage == "int8" and t.dtype != np.int8]
    if kept:
        cache.notes.append(f"cached tensors {kept} hold infinities (a mask) and stay float32")
    return cache


def _store(storage: str, value: np.ndarray, tensor: np.ndarray, scale: np.ndarray | None, rows: np.ndarray) -> None:
    if storage == "float32":
        tensor[rows] = value
    elif storage == "float16":
        finite = np.abs(value[np.isfinite(value)])
        big = float(finite.max()) if finite.size else 0.0
        if big > _FP16_MAX:
            raise ValueError(f"prefix cache: an activation of {big:.4g} does not fit float16 (largest "
                             f"{_FP16_MAX:.0f}); cache in float32 or int8")
        tensor[rows] = value.astype(np.float16)
    else:
        if not np.isfinite(value).all():
            raise ValueError("prefix cache: an activation stored as int8 became infinite in a later batch; "
                             "cache in float32 or float16")
        peak = np.abs(value).max(axis=-1)
        s = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        tensor[rows] = np.clip(np.rint(value / s[..., None]), -127, 127).astype(np.int8)
        scale[rows] = s


def _check_batch_major(program, xs, batch: int) -> None:
    """Each sample's activations must lie in its own slice of the first axis and must not depend
    on the other samples of its batch (the compiler checked only the shapes): the prefix of a
    batch in reverse order must give the same slices reversed, and the first sample's slice must
    be the same beside other samples as beside copies of itself (a batch mean would differ)."""
    rows = np.arange(min(batch, len(xs[0])))
    rows = np.concatenate([rows, np.repeat(rows[-1:], batch - len(rows))])
    mixed = program.prefix(*(a[rows] for a in xs))
    backward = program.prefix(*(a[rows[::-1]] for a in xs))
    alone = program.prefix(*(a[np.zeros(batch, dtype=np.int64)] for a in xs))
    for k, (f, b, one) in enumerate(zip(mixed, backward, alone)):
        f, b, one = f.reshape(batch, -1), b.reshape(batch, -1)[::-1], one.reshape(batch, -1)
        tol = dict(rtol=1e-4, atol=1e-5 * (1 + float(np.abs(f[np.isfinite(f)]).max(initial=0))))
        if not (np.allclose(f, b, **tol) and np.allclose(f[0], one[0], **tol)):
            raise ValueError(f"prefix cache: cached activation {k} of shape {program.layout.cached()[k].shape} "
                             "mixes the samples of a batch (a batch statistic in the frozen layers?), so it "
                             "cannot be cached per sample; fine-tune without prefix_cache")
