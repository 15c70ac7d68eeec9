"""What each training-graph optimization buys: MobileNetV2-w0.35@128 on the host CPU.

For each scheme and optimization setting, compiles the step, records the planned step storage
(static memory plan) and measures step time and training memory in a separate process that only
loads the saved program (same method as bench_step.py).

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

# name -> pipeline keywords; "none" is the unoptimized baseline
SETTINGS = {
    "none": {"reorder_updates": False, "in_place": False},
    "reorder": {"reorder_updates": True, "in_place": False},
    "reorder+in-place": {"reorder_updates": True, "in_place": True},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--schemes", default="full,bias-only,tte-mbv2")
    args = parser.parse_args()

    import torch

    import pock_tvm
    from pock_tvm.models import MobileNetV2

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes.split(","):
            for name, settings in SETTINGS.items():
                torch.manual_seed(0)
                model = MobileNetV2(width_mult=0.35, num_classes=10)
                program = pock_tvm.compile(model, (torch.zeros(args.batch, 3, 128, 128),), scheme=scheme,
                                           optimizer=pock_tvm.SGD(lr=0.05, momentum=0.9), **settings)
                path = Path(tmp) / f"{scheme}-{name}"
                program.save(path)
                measured = _run_child(["pock_tvm", str(path), str(args.batch)])
                rows.append({"scheme": scheme, "optimizations": name, "batch": args.batch,
                             "planned_step_bytes": program.report().planned["train_step"],
                             "saved_activation_bytes": program.report().sparse["saved_activation_bytes"],
                             **measured})
                print(json.dumps(rows[-1]), flush=True)
    base = next(r for r in rows if r["scheme"] == "full" and r["optimizations"] == "none")
    best = min(rows, key=lambda r: r["train_mib"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = f"python benchmarks/bench_optimizations.py --out {args.out}"
    (out / "optimizations_mbv2_host.json").write_text(json.dumps(
        {"command": command, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    lines = [f"# Training-graph optimizations, MobileNetV2-w0.35@128, batch {args.batch}, host CPU",
             "", f"`{command}`. Train MiB: peak RSS during steps minus RSS with the program loaded "
             "(separate process). Planned: bytes of the step's static memory plan.", "",
             "| scheme | optimizations | step ms | train MiB | planned MiB | saved activations MiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['optimizations']} | {r['step_ms']:.1f} | {r['train_mib']:.1f} | "
                     f"{r['planned_step_bytes'] / 2**20:.1f} | {r['saved_activation_bytes'] / 2**20:.2f} |")
    lines += ["", f"full backprop without optimizations / best sparse+optimized, measured: "
              f"{base['train_mib'] / best['train_mib']:.1f}x; planned: "
              f"{base['planned_step_bytes'] / best['planned_step_bytes']:.1f}x "
              f"({best['scheme']}, {best['optimizations']})."]
    (out / "optimizations_mbv2_host.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
