"""Fine-tune a compiled program on arrays in memory and measure its accuracy: what the scheme search
and the demo run for every scheme they compare."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from ..runtime.program import Program


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)

    @property
    def median_step_ms(self) -> float:
        return statistics.median(self.step_ms[1:] or self.step_ms)


def batch_size(program: Program) -> int:
    return int(program.layout.inputs[0].shape[0])


def fit(program: Program, x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0) -> FitResult:
    """``epochs`` passes over ``(x, y)`` in shuffled batches of the compiled batch size (the last
    partial batch of each epoch is dropped); stops with an error on a non-finite loss."""
    batch = batch_size(program)
    if len(x) < batch:
        raise ValueError(f"fine-tune: {len(x)} samples are fewer than one batch of {batch}; compile "
                         "for a smaller batch or give more samples")
    rng = np.random.default_rng(seed)
    y = y.astype(program.layout.target.dtype, copy=False)
    result = FitResult()
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            take = order[i:i + batch]
            start = time.perf_counter()
            loss = program.step(x[take], y[take])
            result.step_ms.append(1e3 * (time.perf_counter() - start))
            if not np.isfinite(loss):
                raise ValueError(f"fine-tune: the loss is {loss} after {len(result.losses)} steps; lower "
                                 "the learning rate")
            result.losses.append(loss)
    return result


def predict(program: Program, x: np.ndarray) -> np.ndarray:
    """The program's outputs for every row of ``x`` (the last batch padded by repeating rows)."""
    batch = batch_size(program)
    outputs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        outputs.append(program.predict(padded)[:len(chunk)])
    return np.concatenate(outputs)


def accuracy(program: Program, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(program, x).argmax(axis=1) == y).mean())
