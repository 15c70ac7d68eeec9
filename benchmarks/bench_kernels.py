"""Step time of pock_tvm with kernel schedules off ("untuned") and on (default CPU schedules), and of
PyTorch eager with the same trainable set, alternating A/B/C in one process (only ratios hold on a
noisy shared machine). Speed only; memory is bench_step.py's job.

    python benchmarks/bench_kernels.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {  # model -> (factory, input shape without batch, sparse scheme)
    "mobilenetv2": ("MobileNetV2(width_mult=0.35, num_classes=10)", (3, 128, 128), "tte-mbv2"),
    "resnet18": ("ResNet18(num_classes=10)", (3, 64, 64), "last-2"),
}


def _torch_step(model, trained: set[str], x, y):
    import torch

    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _timed(step, count: int) -> list[float]:
    out = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        out.append(1e3 * (time.perf_counter() - start))
    return out


def measure(model_name: str, scheme: str, batch: int, rounds: int, steps: int) -> dict:
    import numpy as np
    import torch

    import pock_tvm
    from pock_tvm.models import MobileNetV2, ResNet18  # noqa: F401  (CASES names them)
    from pock_tvm.options import PipelineOptions

    factory, shape, _ = CASES[model_name]
    torch.manual_seed(0)
    model = eval(factory).eval()  # noqa: S307 -- a fixed table above
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape)).astype("float32")
    y = rng.integers(0, 10, batch)
    sgd = pock_tvm.SGD(lr=0.05, momentum=0.9)
    runs, compile_s = {}, {}
    from pock_tvm.tuning import shipped_database

    variants = [("untuned", PipelineOptions(schedule_kernels=False), False), ("default", PipelineOptions(), False)]
    if shipped_database() is not None:
        variants.append(("tuned", PipelineOptions(), shipped_database()))
    for label, options, database in variants:
        start = time.perf_counter()
        program = pock_tvm.compile(model, (torch.from_numpy(x),), scheme=scheme, optimizer=sgd, options=options,
                                   tuning_database=database)
        compile_s[label] = round(time.perf_counter() - start, 1)
        runs[label] = (lambda p: (lambda: p.step(x, y)))(program)
    trained = {p.source for p in program.layout.params if p.trainable}
    runs["torch"] = _torch_step(model, trained, torch.from_numpy(x), torch.from_numpy(y))
    times = {k: [] for k in runs}
    for step in runs.values():
        _timed(step, 2)  # warm-up
    for _ in range(rounds):  # alternate, so drifts of the machine hit every side alike
        for label, step in runs.items():
            times[label] += _timed(step, steps)
    ms = {k: round(statistics.median(v), 2) for k, v in times.items()}
    flops = program.report().sparse["backward_flops"]
    step_flops = flops + program.report().sparse["forward_flops"]
    best = ms.get("tuned", ms["default"])
    return {"model": model_name, "scheme": scheme, "batch": batch, "step_ms": ms, "compile_s": compile_s,
            "step_gflop": round(step_flops / 1e9, 3), "tuned_gflops": round(step_flops / best / 1e6, 1),
            "torch_gflops": round(step_flops / ms["torch"] / 1e6, 1),
            "torch_over_tuned": round(ms["torch"] / ms.get("tuned", ms["default"]), 2),
            "torch_over_default": round(ms["torch"] / ms["default"], 2),
            "torch_over_untuned": round(ms["torch"] / ms["untuned"], 2),
            "backward_gflop": round(flops / 1e9, 3)}


def sgemm_peak() -> float:
    """GFLOP/s of numpy's float32 matrix product (its BLAS, all cores): the machine's practical peak."""
    from pock_tvm.runtime.profile import sgemm_peak as measured

    return round(measured(size=2048, repeat=5), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--models", default="mobilenetv2,resnet18")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    import torch
    import tvm

    peak = sgemm_peak()
    rows = []
    for model_name in args.models.split(","):
        for scheme in ("full", CASES[model_name][2]):
            for batch in map(int, args.batches.split(",")):
                rows.append(measure(model_name, scheme, batch, args.rounds, args.steps))
                print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/bench_kernels.py --out " + args.out
    meta = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "tvm": tvm.__version__,
            "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "steps_per_round": args.steps,
            "sgemm_gflops": peak}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_host.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Kernel schedules: step time on the host CPU ({meta['date']})", "",
             f"`{command}` on {meta['machine']}; torch {meta['torch']} ({meta['torch_threads']} threads), "
             f"TVM {meta['tvm']}. pock_tvm `Program.step` and torch eager alternate in one process "
             f"({args.rounds} rounds of {args.steps} steps each, median). untuned: kernels as TVM's "
             "legalization writes them (scalar loops); default: `ScheduleForCPU`; tuned: the database shipped "
             "for this CPU (`make tune-host`, MetaSchedule) with defaults for the kernels it lacks.", "",
             "| model | scheme | batch | untuned ms | default ms | tuned ms | torch ms | torch / tuned | torch / default "
             "| torch / untuned | GFLOP/s tuned (torch) | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["step_ms"]
        tuned = f"{ms['tuned']:.1f}" if "tuned" in ms else "-"
        lines.append(f"| {r['model']} | {r['scheme']} | {r['batch']} | {ms['untuned']:.1f} | {ms['default']:.1f} | "
                     f"{tuned} | {ms['torch']:.1f} | {r['torch_over_tuned']:.2f}x | {r['torch_over_default']:.2f}x | "
                     f"{r['torch_over_untuned']:.2f}x | {r['tuned_gflops']:.0f} ({r['torch_gflops']:.0f}) | "
                     f"{r['compile_s'].get('tuned', r['compile_s']['default']):.0f} |")
    lines += ["", f"GFLOP/s: the step's forward and backward FLOPs (pock_tvm's count for the scheme) per second; "
              f"numpy's float32 SGEMM reaches {peak:.0f} GFLOP/s here (the practical peak). compile s: one "
              "`pock_tvm.compile` of the step with the database.",
              "", "torch / X above 1 means pock_tvm is faster. torch trains the same parameters "
              "(requires_grad=False elsewhere); it cannot slice a weight gradient, so partial-channel "
              "weights get a full gradient there."]
    (out / "kernels_host.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
