"""Conv layout per target: the training step compiled with its convs in NCHW (as imported) and in
NHWC (Relax ConvertLayout, weights HWIO), default kernel schedules for both (the shipped database is
tuned for NCHW), alternating in one process. Decides each CPU preset's ``conv_layout``.

    python benchmarks/bench_layouts.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

from bench_kernels import CASES, ROOT, _timed  # noqa: F401  (ROOT puts the project on sys.path)

CONFIGS = [("mobilenetv2", "full", 1), ("mobilenetv2", "full", 8), ("mobilenetv2", "tte-mbv2", 8),
           ("resnet18", "full", 1), ("resnet18", "full", 8)]


def measure(model_name: str, scheme: str, batch: int, rounds: int, steps: int) -> dict:
    import numpy as np
    import torch
    import tvm

    import pock_tvm
    from pock_tvm.models import MobileNetV2, ResNet18  # noqa: F401  (CASES names them)
    from pock_tvm.targets import PRESETS

    factory, shape, _ = CASES[model_name]
    torch.manual_seed(0)
    model = eval(factory).eval()  # noqa: S307 -- a fixed table
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape)).astype("float32")
    y = rng.integers(0, 10, batch)
    runs, kernels, layout_kernels, losses = {}, {}, {}, {}
    for layout in ("NCHW", "NHWC"):
        program = pock_tvm.compile(model, (torch.from_numpy(x),), scheme=scheme, tuning_database=False,
                                   optimizer=pock_tvm.SGD(lr=0.05, momentum=0.9),
                                   target=replace(PRESETS["host"], conv_layout=layout))
        names = [g.name_hint for g, f in program.ir.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
        kernels[layout] = len(names)
        layout_kernels[layout] = sum("transpose" in n.replace("conv2d_transpose", "") for n in names)
        losses[layout] = program.step(x, y)
        runs[layout] = (lambda p: (lambda: p.step(x, y)))(program)
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for label, step in runs.items():
            times[label] += _timed(step, steps)
    ms = {k: round(statistics.median(v), 2) for k, v in times.items()}
    return {"model": model_name, "scheme": scheme, "batch": batch, "step_ms": ms,
            "nhwc_over_nchw": round(ms["NHWC"] / ms["NCHW"], 2), "kernels": kernels,
            "layout_transform_kernels": layout_kernels, "first_loss": losses}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import tvm

    rows = []
    for config in CONFIGS:
        rows.append(measure(*config, args.rounds, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/bench_layouts.py --out " + args.out
    meta = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "tvm": tvm.__version__,
            "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "steps_per_round": args.steps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layouts_host.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Conv layouts: training step time on the host CPU ({meta['date']})", "",
             f"`{command}` on {meta['machine']}, TVM {meta['tvm']}. The same step compiled with convs in NCHW "
             "(as imported) and NHWC (Relax `ConvertLayout`, weights HWIO), default schedules (no tuning "
             f"database), alternating in one process ({args.rounds} rounds of {args.steps} steps, median).", "",
             "| model | scheme | batch | NCHW ms | NHWC ms | NHWC / NCHW | kernels NCHW (NHWC) "
             "| layout transforms NCHW (NHWC) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['scheme']} | {r['batch']} | {r['step_ms']['NCHW']:.1f} | "
                     f"{r['step_ms']['NHWC']:.1f} | {r['nhwc_over_nchw']:.2f}x | {r['kernels']['NCHW']} "
                     f"({r['kernels']['NHWC']}) | {r['layout_transform_kernels']['NCHW']} "
                     f"({r['layout_transform_kernels']['NHWC']}) |")
    lines += ["", "Above 1x NHWC is slower. ConvertLayout converts the forward's convs; the backward's "
              "`conv2d_transpose` and weight-gradient convs keep their layouts, so transposes run between "
              "them (the extra kernels). The presets keep `conv_layout = \"NCHW\"`; a target file can set "
              "`conv_layout = \"NHWC\"` (measure it on the board first)."]
    (out / "layouts_host.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
