"""A scheduled TIR kernel against the same kernel unscheduled, run once on random inputs.

A schedule must never change what a kernel computes (only the order of a sum's terms). This is
the check that holds every schedule to that: the default rules (``ScheduleForCPU``), tuned records
(``ApplyTuningDatabase``, ``pock-tvm tune``) and the fuzz tests all go through :func:`compare`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm

# A reordered float32 sum of n terms differs by about sqrt(n) roundings of its partial sums; for
# the reductions of a training step (n up to ~1e6) that stays below 1e-4 of the output's largest
# value. A wrong schedule (a missing tap of a window, a wrong border, a stale accumulator) is off
# by at least ~1e-2 of it.
RTOL = 2e-4
# where a kernel names the rules that scheduled it (ScheduleForCPU sets it)
RULES_ATTR = "pock_tvm.schedule_rules"


@dataclass
class KernelCheck:
    """One kernel checked: ``error`` is the largest ``|scheduled - plain| / max|plain|`` over the
    buffers the kernel writes (``buffer`` the worst one); ``ok`` when it is within ``RTOL`` and
    NaN/inf appear in the same places."""

    kernel: str
    rules: str
    error: float
    buffer: str
    ok: bool

    def describe(self) -> str:
        return (f"kernel {self.kernel} (scheduled by {self.rules}) computes {self.buffer} with a relative "
                f"error of {self.error:.2g} against its unscheduled form")


def static_shapes(func: tvm.tirx.PrimFunc) -> list[tuple[tuple[int, ...], str]] | None:
    """``(shape, dtype)`` of each parameter buffer, or None when a parameter is not a buffer of a
    static shape (a kernel over symbolic shapes cannot be run on made-up inputs)."""
    found = []
    for p in func.params:
        if not hasattr(p, "shape"):
            return None
        if not all(isinstance(d, tvm.tirx.IntImm) for d in p.shape):
            return None
        found.append((tuple(int(d) for d in p.shape), str(p.dtype)))
    return found


def random_arguments(func: tvm.tirx.PrimFunc, seed: int = 0) -> list[np.ndarray] | None:
    """Inputs for one run of ``func``: normal floats, full-range 8-bit integers, and zeros for
    wider integers (they are mostly indices: any other value could read out of bounds)."""
    shapes = static_shapes(func)
    if shapes is None:
        return None
    rng = np.random.default_rng(seed)
    args = []
    for shape, dtype in shapes:
        if dtype.startswith(("float", "bfloat")):
            args.append(rng.standard_normal(shape).astype(dtype))
        elif dtype in ("int8", "uint8"):
            info = np.iinfo(dtype)
            args.append(rng.integers(info.min, info.max + 1, size=shape).astype(dtype))
        elif dtype == "bool":
            args.append(rng.integers(0, 2, size=shape).astype(bool))
        else:
            args.append(np.zeros(shape, dtype))
    return args


def reference_target(target: tvm.target.Target) -> tvm.target.Target:
    """Where the unscheduled kernel runs: a CPU target's plain LLVM (the architecture's baseline
    ISA, no CPU tuning), so that a miscompile by one CPU's tuning (``GENERIC_TUNING`` in
    ``pock_tvm.targets.toolchain``) shows as a difference instead of hiding in both; other targets
    as they are."""
    if target.kind.name != "llvm":
        return target
    triple = target.attrs.get("mtriple")
    return tvm.target.Target({"kind": "llvm", **({"mtriple": str(triple)} if triple else {})})


def run_kernels(funcs: list[tvm.tirx.PrimFunc], args: list[np.ndarray], target: tvm.target.Target
                ) -> list[list[np.ndarray]]:
    """For each of ``funcs`` (kernels of the same signature, compiled together): every parameter
    buffer after one call on fresh copies of ``args`` (outputs, and buffers updated in place)."""
    lib = tvm.compile(tvm.IRModule({f"k{i}": f.with_attr("global_symbol", f"k{i}") for i, f in enumerate(funcs)}),
                      target=target)
    results = []
    for i in range(len(funcs)):
        tensors = [tvm.runtime.tensor(np.array(a, copy=True)) for a in args]
        lib[f"k{i}"](*tensors)
        results.append([t.numpy() for t in tensors])
    return results


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """``max|got - want| / max|want|`` over the finite values; inf where NaN or inf differ in place."""
    if got.dtype == bool or want.dtype == bool:
        return 0.0 if np.array_equal(got, want) else float("inf")
    got, want = got.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(want)
    if not np.array_equal(finite, np.isfinite(got)) or not np.array_equal(np.isnan(got), np.isnan(want)):
        return float("inf")
    if not np.array_equal(got[np.isinf(want)], want[np.isinf(want)]):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(float(np.abs(want[finite]).max()), 1e-30)
    return float(np.abs(got[finite] - want[finite]).max()) / scale


def compare(name: str, plain: tvm.tirx.PrimFunc, scheduled: tvm.tirx.PrimFunc, target: tvm.target.Target,
            seed: int = 0, rtol: float = RTOL) -> KernelCheck | None:
    """``scheduled`` against ``plain`` (the same kernel before scheduling) on one set of random
    inputs; None when the kernel cannot be run on made-up inputs (symbolic shapes)."""
    args = random_arguments(plain, seed)
    if args is None or static_shapes(scheduled) != static_shapes(plain):
        return None
    try:
        want = run_kernels([plain], args, reference_target(target))[0]
    except (RuntimeError, ValueError, TypeError):  # e.g. an intrinsic of the target's ISA
        want = run_kernels([plain], args, target)[0]
    got = run_kernels([scheduled], args, target)[0]
    error, buffer = max(_errors(got, want, args, plain), default=(0.0, ""))
    rules = str(scheduled.attrs[RULES_ATTR]) if scheduled.attrs and RULES_ATTR in scheduled.attrs else "a tuned record"
    return KernelCheck(name, rules, error, buffer, error <= rtol)


def _errors(got, want, args, plain) -> list[tuple[float, str]]:
    """The error of each buffer that either run wrote."""
    found = []
    for g, w, a, p in zip(got, want, args, plain.params):
        if np.array_equal(g, a) and np.array_equal(w, a):
            continue  # an input neither run changed
        found.append((relative_error(g, w), str(p.name)))
    return found


def host_target() -> tvm.target.Target:
    """This machine's CPU as an LLVM target: what the checks compile for. A schedule's numbers do
    not depend on the target it was made for, so a cross target's records are checked here too."""
    from ..targets.toolchain import system_cpu

    return tvm.target.Target({"kind": "llvm", "mcpu": system_cpu()})


def check_record(record, target: tvm.target.Target | None = None, seed: int = 0) -> KernelCheck | None:
    """A MetaSchedule tuning record (its trace applied to its workload) against the workload
    unscheduled; None when it cannot be run on made-up inputs."""
    from tvm import s_tir

    plain = record.workload.mod["main"]
    sch = s_tir.Schedule(record.workload.mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return compare(str(plain.attrs.get("global_symbol", "main")) if plain.attrs else "main", plain,
                   sch.mod["main"], target or host_target(), seed)


def check_database(work_dir, target: tvm.target.Target | None = None) -> list[KernelCheck]:
    """The best record of every workload in a MetaSchedule JSON database (what ``compile`` would
    apply), each checked against its workload unscheduled."""
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    seen, checks = set(), []
    for record in db.get_all_tuning_records():
        key = record.workload.mod.script()
        if key in seen:
            continue
        seen.add(key)
        check = check_record(db.get_top_k(record.workload, 1)[0], target)
        if check is not None:
            checks.append(check)
    return checks
