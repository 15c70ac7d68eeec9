"""``pock-tvm profile``: where a compiled training step spends its time, kernel by kernel."""

from __future__ import annotations

import re
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


def sgemm_peak(size: int = 1024, repeat: int = 5) -> float:
    """GFLOP/s of numpy's float32 matrix product (its BLAS, its threads) on ``size``-square
    matrices, the best of ``repeat``: this machine's practical peak for matmul-class kernels,
    measured in the same run as the kernels it is set against."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size)).astype("float32") for _ in range(2))
    a @ b  # the BLAS's threads and buffers
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


# kernel classes by name prefix (after TVM's "fused_"), longest first where one is the start of another
KERNEL_CLASSES = ("conv2d_transpose", "conv2d", "conv1d_transpose", "conv1d", "batch_matmul", "matmul", "dense",
                  "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "log_softmax", "softmax", "layer_norm",
                  "rms_norm", "take", "cumsum")


def kernel_class(name: str) -> str:
    """The op a kernel is named for, without TVM's fusion prefix and numbering:
    ``fused_conv2d_transpose4_greater2_where3`` -> ``conv2d_transpose``, ``matmul7`` -> ``matmul``;
    names outside :data:`KERNEL_CLASSES` give their first op (``fused_relu2_add`` -> ``relu``)."""
    stripped = name.removeprefix("fused_")
    known = next((c for c in KERNEL_CLASSES if stripped.startswith(c)), None)
    return known or re.sub(r"\d+$", "", stripped.split("_", 1)[0]) or name


def by_class(rows: list[KernelRow]) -> list[tuple[str, float, float | None]]:
    """``(class, ms per step, GFLOP/s)`` per :func:`kernel_class`, slowest first; the rate counts
    the kernels whose FLOPs are known."""
    ms, known_ms, gflop = defaultdict(float), defaultdict(float), defaultdict(float)
    for r in rows:
        c = kernel_class(r.name)
        ms[c] += r.ms_per_step
        if r.gflops is not None:
            known_ms[c] += r.ms_per_step
            gflop[c] += r.gflops * r.ms_per_step / 1e3
    return [(c, t, gflop[c] / (known_ms[c] / 1e3) if known_ms[c] > 0 else None)
            for c, t in sorted(ms.items(), key=lambda kv: -kv[1])]


def format_profile(step_ms: float, rows: list[KernelRow], top: int = 15, peak: float | None = None) -> str:
    """The table ``pock-tvm profile`` prints: the slowest ``top`` kernels, then the time and rate per
    kernel class; with ``peak`` (:func:`sgemm_peak`, GFLOP/s) each rate also as its share of it."""
    def rate(gflops):
        if gflops is None:
            return f"{'-':>8}" + (f" {'-':>7}" if peak else "")
        return f"{gflops:8.2f}" + (f" {100 * gflops / peak:6.1f}%" if peak else "")

    of_peak = f" {'of SGEMM':>8}" if peak else ""
    lines = [f"step {step_ms:.2f} ms (median, uninstrumented); {len(rows)} kernels, "
             f"{sum(r.ms_per_step for r in rows):.2f} ms summed under the instrument"]
    if peak:
        lines.append(f"numpy float32 SGEMM on this machine, same run: {peak:.1f} GFLOP/s (the practical peak)")
    lines += ["", f"{'kernel':<64} {'ms/step':>8} {'share':>7} {'GFLOP/s':>8}{of_peak}"]
    for r in rows[:top]:
        lines.append(f"{r.name[:64]:<64} {r.ms_per_step:8.3f} {100 * r.share:6.1f}% {rate(r.gflops)}")
    rest = rows[top:]
    if rest:
        lines.append(f"{'(' + str(len(rest)) + ' more)':<64} {sum(r.ms_per_step for r in rest):8.3f} "
                     f"{100 * sum(r.share for r in rest):6.1f}%")
    summed = sum(r.ms_per_step for r in rows) or 1.0
    lines += ["", f"{'kernel class':<64} {'ms/step':>8} {'share':>7} {'GFLOP/s':>8}{of_peak}"]
    for name, ms, gflops in by_class(rows)[:top]:
        lines.append(f"{name[:64]:<64} {ms:8.3f} {100 * ms / summed:6.1f}% {rate(gflops)}")
    return "\n".join(lines)
