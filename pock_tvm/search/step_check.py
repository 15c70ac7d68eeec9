"""The step-time check of a searched scheme: its compiled step timed on this machine, alone against
a time in milliseconds, or alternating with a reference scheme's step (only ratios hold on a
shared machine). The analysis estimates an option's step (a shared program's, scaled by FLOPs);
this is what the step takes."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

ROUNDS = 8  # timed rounds (one step of each program per round), after one round of warm-up


@dataclass(frozen=True)
class StepCheck:
    step_ms: float  # the chosen scheme's median step
    rounds: int
    reference_ms: float | None = None  # the reference scheme's median step, timed in the same rounds
    ratio: float | None = None  # median of the rounds' chosen / reference

    def excess_ms(self, latency_ms: float) -> float:
        """How much the step is over ``latency_ms`` (<= 0: within); against a reference, the
        ratio's excess in the analysis's milliseconds (``latency_ms``: the reference's estimate)."""
        if self.ratio is not None:
            return (self.ratio - 1.0) * latency_ms
        return self.step_ms - latency_ms

    def describe(self, reference: str | None = None) -> str:
        if self.ratio is None:
            return f"measured step: {self.step_ms:.1f} ms (median of {self.rounds} steps)"
        return (f"measured step: {self.step_ms:.1f} ms, {reference or 'the reference'} {self.reference_ms:.1f} ms "
                f"in the same {self.rounds} alternating rounds: {self.ratio:.3f}x (median per round)")

    def to_json(self) -> dict:
        return {"step_ms": self.step_ms, "rounds": self.rounds, "reference_ms": self.reference_ms,
                "ratio": self.ratio}

    @staticmethod
    def from_json(data: dict) -> StepCheck:
        return StepCheck(float(data["step_ms"]), int(data["rounds"]),
                         None if data.get("reference_ms") is None else float(data["reference_ms"]),
                         None if data.get("ratio") is None else float(data["ratio"]))


def step_args(x, y: np.ndarray, batch: int) -> tuple:
    """One batch of ``(x, y)`` as a step's arguments (``x``: an array or a tuple of arrays)."""
    xs = x if isinstance(x, (tuple, list)) else (x,)
    return (*(np.ascontiguousarray(a[:batch]) for a in xs), np.ascontiguousarray(np.asarray(y)[:batch]))


def time_steps(programs: list, args: tuple, rounds: int = ROUNDS) -> list[list[float]]:
    """Milliseconds of each program's step over ``rounds`` rounds of one step each, the order
    reversed every other round (neither always runs first), after a round of warm-up. Every step
    updates its program's weights: time copies the caller does not need afterwards."""
    times = [[] for _ in programs]
    for r in range(rounds + 1):
        order = list(range(len(programs)))[::1 if r % 2 == 0 else -1]
        for i in order:
            start = time.perf_counter()
            programs[i].step(*args)
            if r:
                times[i].append(1e3 * (time.perf_counter() - start))
    return times


def check_step(program, args: tuple, reference=None, rounds: int = ROUNDS) -> StepCheck:
    """The step of ``program``, alone or alternating with ``reference`` (a compiled program)."""
    if reference is None:
        (mine,) = time_steps([program], args, rounds)
        return StepCheck(round(statistics.median(mine), 2), rounds)
    mine, theirs = time_steps([program, reference], args, rounds)
    ratio = statistics.median(a / b for a, b in zip(mine, theirs))
    return StepCheck(round(statistics.median(mine), 2), rounds, round(statistics.median(theirs), 2), round(ratio, 4))
