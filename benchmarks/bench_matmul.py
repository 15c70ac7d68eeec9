"""Matmul-class kernels of the default schedules against this CPU's SGEMM peak.

Schedules each matmul shape of a SmolLM2-135M step at 1x128 tokens (attention and MLP projections,
the LM head and its input gradient, a weight gradient) with ``ScheduleForCPU`` for the host target,
checks its numbers against numpy, and times it against numpy's float32 matmul (its BLAS, its
threads) on the same arrays, alternating in one process: GFLOP/s of each and our share of numpy's.
Issue 23's goal for these shapes is 80% of SGEMM.

    python benchmarks/bench_matmul.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from bench_kernels import ROOT  # noqa: F401  (ROOT puts the project on sys.path)

# (M, K, N, what it is in a SmolLM2 step at 128 tokens)
SHAPES = [(128, 576, 576, "q/o projection"), (128, 576, 1536, "MLP gate/up"), (128, 1536, 576, "MLP down"),
          (128, 576, 49152, "LM head"), (128, 49152, 576, "LM head input gradient"),
          (576, 128, 1536, "weight gradient (K = tokens)")]


def _kernel(m: int, k: int, n: int):
    import tvm
    from tvm import relax, te

    from pock_tvm.passes import ScheduleForCPU
    from pock_tvm.targets import load_target
    from pock_tvm.targets.toolchain import tvm_target

    bb = relax.BlockBuilder()
    a, b = relax.Var("a", relax.TensorType((m, k), "float32")), relax.Var("b", relax.TensorType((k, n), "float32"))

    def matmul(x, w):
        r = te.reduce_axis((0, k), name="k")
        return te.compute((m, n), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="matmul")

    with bb.function("f", [a, b]):
        bb.emit_func_output(bb.emit_te(matmul, a, b, primfunc_name_hint="main"))
    target = tvm_target(load_target("host"))
    with target:
        mod = ScheduleForCPU()(bb.get())
    func = next(f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    return tvm.tirx.build(func.with_attr("global_symbol", "main"), target=target)["main"]


def measure(m: int, k: int, n: int, rounds: int) -> dict:
    import numpy as np
    import tvm

    kernel = _kernel(m, k, n)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), dtype="float32"), rng.standard_normal((k, n), dtype="float32")
    ta, tb, tc = tvm.runtime.tensor(a), tvm.runtime.tensor(b), tvm.runtime.tensor(np.zeros((m, n), "float32"))
    kernel(ta, tb, tc)
    np.testing.assert_allclose(tc.numpy(), a @ b, rtol=2e-3, atol=2e-2)  # never a fast wrong number
    ours, theirs = [], []
    for _ in range(rounds):  # alternating
        start = time.perf_counter()
        kernel(ta, tb, tc)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        a @ b
        theirs.append(time.perf_counter() - start)
    flop = 2 * m * k * n
    return {"m": m, "k": k, "n": n, "pock_tvm_gflops": round(flop / min(ours) / 1e9, 1),
            "numpy_gflops": round(flop / min(theirs) / 1e9, 1),
            "share": round(min(theirs) / min(ours), 3), "median_ms": round(1e3 * statistics.median(ours), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    from pock_tvm.runtime.files import write_json
    from pock_tvm.tuning import host_isa

    rows = []
    for m, k, n, what in SHAPES:
        rows.append({**measure(m, k, n, args.rounds), "what": what})
        print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/bench_matmul.py --out benchmarks/results"
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "matmul_host.json", {"machine": platform.machine(), "isa": host_isa(), "command": command,
                                               "date": time.strftime("%Y-%m-%d"), "rows": rows})
    lines = [f"# Matmul kernels against SGEMM on the host CPU ({host_isa()}; {time.strftime('%Y-%m-%d')})", "",
             f"`{command}`", "",
             "Default schedules (`ScheduleForCPU`), one kernel call against numpy's float32 matmul on the same "
             "arrays, alternating, best of the rounds; the issue's goal is 80% of SGEMM.", "",
             "| shape (M x K x N) | in a SmolLM2 step | pock_tvm GFLOP/s | numpy GFLOP/s | share of SGEMM |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['m']}x{r['k']}x{r['n']} | {r['what']} | {r['pock_tvm_gflops']} | {r['numpy_gflops']} | "
              f"{100 * r['share']:.0f}% |" for r in rows]
    (args.out / "matmul_host.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
