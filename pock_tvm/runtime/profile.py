"""``pock-tvm profile``: where a compiled training step spends its time, kernel by kernel."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .program import Program


@dataclass
class KernelRow:
    name: str
    ms_per_step: float
    share: float  # of the summed kernel time
    gflops: float | None  # achieved rate, where the kernel's FLOPs are known


def profile(path: str | Path, steps: int = 5, warmup: int = 2) -> tuple[float, list[KernelRow]]:
    """:func:`profile_program` of the bundle at ``path`` (the bundle on disk is not changed)."""
    return profile_program(Program.load(path), steps, warmup)


def profile_program(program: Program, steps: int = 5, warmup: int = 2) -> tuple[float, list[KernelRow]]:
    """Run ``steps`` training steps on random inputs of the program's shapes with learning rate 0
    and time every kernel call through the VM's instrument hook. Returns the median step time
    without instrumentation (ms) and one row per kernel, slowest first."""
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(s.shape).astype(s.dtype) if s.dtype.startswith("float")
              else np.zeros(s.shape, s.dtype) for s in program.layout.inputs]
    spec = program.layout.target
    classes = program.layout.output.shape[-1] if program.layout.output.shape else 1
    target = (rng.integers(0, classes, spec.shape).astype(spec.dtype) if spec.dtype.startswith("int")
              else rng.standard_normal(spec.shape).astype(spec.dtype))
    lr = 0.0  # the parameters stay as they are: timing only

    def step():
        program.step(*inputs, target, lr=lr)

    for _ in range(warmup):
        step()
    plain = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        plain.append(1e3 * (time.perf_counter() - start))
    flops = program.report().kernel_flops if program.report() else {}
    total, calls, started = defaultdict(float), defaultdict(int), {}

    def instrument(_func, name, before, _ret, *_args):
        if before:
            started[name] = time.perf_counter()
        elif name in flops or name in started:
            total[name] += time.perf_counter() - started.pop(name, time.perf_counter())
            calls[name] += 1
        return 0

    program.instrument(instrument)
    try:
        for _ in range(steps):
            step()
    finally:
        program.instrument(None)
    kernels = {k: v for k, v in total.items() if not k.startswith("vm.builtin.")}
    summed = sum(kernels.values()) or 1.0
    rows = [KernelRow(name, 1e3 * t / steps, t / summed,
                      flops[name] * calls[name] / t / 1e9 if flops.get(name) and t > 0 else None)
            for name, t in sorted(kernels.items(), key=lambda kv: -kv[1])]
    return float(np.median(plain)), rows


def format_profile(step_ms: float, rows: list[KernelRow], top: int = 15) -> str:
    lines = [f"step {step_ms:.2f} ms (median, uninstrumented); {len(rows)} kernels, "
             f"{sum(r.ms_per_step for r in rows):.2f} ms summed under the instrument", "",
             f"{'kernel':<64} {'ms/step':>8} {'share':>7} {'GFLOP/s':>8}"]
    for r in rows[:top]:
        rate = f"{r.gflops:8.2f}" if r.gflops is not None else f"{'-':>8}"
        lines.append(f"{r.name[:64]:<64} {r.ms_per_step:8.3f} {100 * r.share:6.1f}% {rate}")
    rest = rows[top:]
    if rest:
        lines.append(f"{'(' + str(len(rest)) + ' more)':<64} {sum(r.ms_per_step for r in rest):8.3f} "
                     f"{100 * sum(r.share for r in rest):6.1f}%")
    return "\n".join(lines)
