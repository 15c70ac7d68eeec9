"""Fine-tune a compiled program on arrays in memory and measure its accuracy: what the scheme search
and the demo run for every scheme they compare."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from ..runtime.program import Program
from .prefix_cache import build_cache


@dataclass
class FitResult:
    """Losses and step times of a fine-tune; with a prefix cache, the seconds spent filling it
    (``prefix_s``, outside ``step_ms``) and the host memory it held (``cache_bytes``)."""

    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    prefix_s: float = 0.0
    cache_bytes: int = 0

    @property
    def median_step_ms(self) -> float:
        return statistics.median(self.step_ms[1:] or self.step_ms)


def batch_size(program: Program) -> int:
    return int(program.layout.inputs[0].shape[0])


def _inputs(x) -> tuple[np.ndarray, ...]:
    """One input array, or a tuple of them (token ids and attention mask), as a tuple."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def fit(program: Program, x, y: np.ndarray, epochs: int, seed: int = 0,
        prefix_cache: str | None = None, after_step=None) -> FitResult:
    """``epochs`` passes over ``(x, y)`` in shuffled batches of the compiled batch size (the last
    partial batch of each epoch is dropped); ``x`` is an array or a tuple of arrays (the model's
    inputs). Stops with an error on a non-finite loss.

    ``prefix_cache`` (``"float32"``, ``"float16"`` or ``"int8"``; a program compiled with
    ``prefix_cache=True``): the frozen prefix runs once per sample before the first epoch and
    every step starts from its cached activations, stored in that type (float32 gives the numbers
    of the uncached fine-tune). Only for fixed data: augmented inputs change every epoch.

    ``after_step(program)`` runs after every step, outside the step's time (the scheme search
    sets back the tensors an option does not train)."""
    batch = batch_size(program)
    xs = _inputs(x)
    if len(xs[0]) < batch:
        raise ValueError(f"fine-tune: {len(xs[0])} samples are fewer than one batch of {batch}; compile "
                         "for a smaller batch or give more samples")
    rng = np.random.default_rng(seed)
    y = y.astype(program.layout.target.dtype, copy=False)
    result = FitResult()
    cache = None
    if prefix_cache:
        cache = build_cache(program, xs, prefix_cache)
        result.prefix_s, result.cache_bytes = cache.seconds, cache.nbytes
    for _ in range(epochs):
        order = rng.permutation(len(xs[0]))
        for i in range(0, len(xs[0]) - batch + 1, batch):
            take = order[i:i + batch]
            start = time.perf_counter()
            if cache is not None:
                loss = program.step_cached(*cache.batch(take), y[take])
            else:
                loss = program.step(*(a[take] for a in xs), y[take])
            result.step_ms.append(1e3 * (time.perf_counter() - start))
            if not np.isfinite(loss):
                raise ValueError(f"fine-tune: the loss is {loss} after {len(result.losses)} steps; lower "
                                 "the learning rate")
            result.losses.append(loss)
            if after_step is not None:
                after_step(program)
    return result


def predict(program: Program, x) -> np.ndarray:
    """The program's outputs for every row of ``x`` (an array or a tuple of arrays; the last batch
    padded by repeating rows)."""
    batch = batch_size(program)
    xs = _inputs(x)
    outputs = []
    for i in range(0, len(xs[0]), batch):
        chunks = [a[i:i + batch] for a in xs]
        padded = [np.concatenate([c, np.repeat(c[-1:], batch - len(c), axis=0)]) for c in chunks]
        outputs.append(program.predict(*padded)[:len(chunks[0])])
    return np.concatenate(outputs)


def accuracy(program: Program, x, y: np.ndarray) -> float:
    return float((predict(program, x).argmax(axis=1) == y).mean())


def next_token_loss(program: Program, x, labels: np.ndarray) -> float:
    """The mean next-token cross-entropy (nats per token) of a causal LM's logits over ``x``: the
    logits at position ``t`` against ``labels[:, t + 1]``, positions labelled ``IGNORE_INDEX``
    left out, as the ``next_token`` loss computes it. One batch of logits at a time."""
    from ..calling import IGNORE_INDEX

    batch = batch_size(program)
    xs = _inputs(x)
    total, count = 0.0, 0
    for i in range(0, len(xs[0]), batch):
        logits = predict(program, tuple(a[i:i + batch] for a in xs))[:, :-1].astype("float64")
        target = np.asarray(labels[i:i + batch])[:, 1:]
        counted = target != IGNORE_INDEX
        losses = _token_losses(logits, np.where(counted, target, 0))
        total += float((losses * counted).sum())
        count += int(counted.sum())
    if count == 0:
        raise ValueError("next_token_loss: every position is labelled IGNORE_INDEX; nothing to score")
    return total / count


def classification_loss(program: Program, x, y: np.ndarray) -> float:
    """The mean cross-entropy (nats) of a classifier's logits over ``(x, y)``."""
    return float(_token_losses(predict(program, x).astype("float64"), np.asarray(y)).mean())


def _token_losses(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``-log softmax(logits)[target]`` over the last axis, for every position (a stable log-sum-exp)."""
    top = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    return log_z - np.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
