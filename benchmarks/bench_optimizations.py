"""What each training-graph optimization buys: MobileNetV2-w0.35@128 on the host CPU.

Optimizations are switched on one after the other (``pock_tvm.compiler.phases.PHASES``): none,
+ fold frozen, + reorder updates, + in-place updates, + inline kernel scratch. For each scheme,
batch and phase the step is compiled, its planned peak recorded (parameters + optimizer state +
static step storage + largest kernel scratch), and step time and training memory measured in a
separate process that only loads the saved program (method of ``bench_step.py``).

    python benchmarks/bench_optimizations.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import _run_child  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--batches", default="8,1")
    parser.add_argument("--schemes", default="full,bias-only,tte-mbv2")
    parser.add_argument("--all-phases-batch", type=int, default=8,
                        help="batch measured after every phase; other batches: none and all")
    args = parser.parse_args()

    import torch

    import pock_tvm
    from dataclasses import replace

    from pock_tvm.compiler.phases import PHASES
    from pock_tvm.options import NONE
    from pock_tvm.models import MobileNetV2

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in map(int, args.batches.split(",")):
            for scheme in args.schemes.split(","):
                options = NONE
                for index, (phase, change) in enumerate(PHASES):
                    if change:
                        options = replace(options, **{change: True})
                    if batch != args.all_phases_batch and 0 < index < len(PHASES) - 1:
                        continue
                    torch.manual_seed(0)
                    model = MobileNetV2(width_mult=0.35, num_classes=10)
                    start = time.perf_counter()
                    program = pock_tvm.compile(model, (torch.zeros(batch, 3, 128, 128),), scheme=scheme,
                                               optimizer=pock_tvm.SGD(lr=0.05, momentum=0.9), options=options)
                    compile_s = time.perf_counter() - start
                    path = Path(tmp) / f"{scheme}-{batch}-{index}"
                    program.save(path)
                    report = program.report()
                    planned = report.planned
                    peak = (report.param_bytes + report.optimizer_state_bytes + planned["train_step"]
                            + planned["kernel_scratch"])
                    measured = _run_child(["pock_tvm", str(path), str(batch)])
                    rows.append({"scheme": scheme, "batch": batch, "phase": phase, "compile_s": round(compile_s, 1),
                                 "planned_peak_bytes": peak, "step_storage_bytes": planned["train_step"],
                                 "kernel_scratch_bytes": planned["kernel_scratch"],
                                 "saved_activation_bytes": report.sparse["saved_activation_bytes"], **measured})
                    print(json.dumps(rows[-1]), flush=True)
    _write(Path(args.out), rows, PHASES[0][0], PHASES[-1][0])


def _write(out: Path, rows: list[dict], first: str, last: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_optimizations.py --out benchmarks/results"
    (out / "optimizations_mbv2_host.json").write_text(json.dumps(
        {"command": command, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    lines = ["# Training-graph optimizations, MobileNetV2-w0.35@128, host CPU (2 cores, untuned kernels)",
             "", f"`{command}`. Phases are cumulative. Train MiB: peak RSS during steps minus RSS with "
             "the program loaded, in a separate process. Planned peak: parameters + optimizer state "
             "(SGD momentum) + static step storage + largest kernel scratch.", "",
             "| batch | scheme | after phase | step ms | train MiB | planned peak MiB | step storage MiB "
             "| kernel scratch MiB | saved activations MiB |", "|---|---|---|---|---|---|---|---|---|"]
    mib = 2.0 ** 20
    for r in rows:
        lines.append(f"| {r['batch']} | {r['scheme']} | {r['phase']} | {r['step_ms']:.1f} | {r['train_mib']:.1f} "
                     f"| {r['planned_peak_bytes'] / mib:.1f} | {r['step_storage_bytes'] / mib:.1f} "
                     f"| {r['kernel_scratch_bytes'] / mib:.1f} | {r['saved_activation_bytes'] / mib:.2f} |")
    lines.append("")
    for batch in sorted({r["batch"] for r in rows}):
        base = next(r for r in rows if r["batch"] == batch and r["scheme"] == "full" and r["phase"] == first)
        for r in rows:
            if r["batch"] == batch and r["phase"] == last and r["scheme"] != "full":
                lines.append(f"- batch {batch}, full backprop unoptimized / {r['scheme']} with all optimizations: "
                             f"measured {base['train_mib'] / r['train_mib']:.1f}x, planned "
                             f"{base['planned_peak_bytes'] / r['planned_peak_bytes']:.1f}x")
    (out / "optimizations_mbv2_host.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
