"""Quantized fine-tuning on the demo task: float vs int8 with and without QAS.

The demo's pretrained DigitsCNN, quantized by ``pock_tvm.quantization.post_training`` (calibrated on 128 source-domain
digits), fine-tuned on the new sensor's 300 labelled digits with the fixed sparse scheme
``pock_tvm.tasks.digits.sparse_scheme`` (last three BN biases, last conv, classifier), batch 16,
30 epochs, and tested on the 600 held-out digits. Two optimizers: the demo's Adam (lr 1e-3) and
SGD with momentum (lr 0.01, 0.9), TTE's.

    python benchmarks/task_int8_digits.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COMMAND = "python benchmarks/task_int8_digits.py --out benchmarks/results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()

    import pock_tvm
    from pock_tvm.tasks.digits_int8 import compare

    runs = {"Adam lr 1e-3": pock_tvm.Adam(lr=1e-3), "SGD lr 0.01 momentum 0.9": pock_tvm.SGD(lr=0.01, momentum=0.9)}
    results = {}
    for name, optimizer in runs.items():
        results[name] = compare(optimizer, epochs=args.epochs)
        print(name, json.dumps(results[name]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8_digits_host.json").write_text(json.dumps(
        {"command": COMMAND, "date": time.strftime("%Y-%m-%d"), "epochs": args.epochs, "results": results}, indent=1))
    lines = ["# Quantized fine-tuning on the demo task (DigitsCNN, new sensor): float vs int8, with and without QAS",
             "", f"`{COMMAND}`. Scheme `digits-sparse` (last three BN biases, last conv, classifier), batch 16, "
             f"{args.epochs} epochs over 300 labelled digits, 600 held out. int8: per-channel int8 weights, int8 "
             "activations per tensor, calibrated on 128 source-domain digits; trained weights are float32 masters "
             "in integer units. Planned: the compiler's training memory at batch 16 (step storage + scratch + "
             "optimizer state).", "",
             "| optimizer | model | test accuracy before | after | last loss | planned training KiB | weights KiB |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for model, r in rows.items():
            lines.append(f"| {name} | {model} | {100 * r['accuracy_before']:.1f}% | {100 * r['test_accuracy']:.1f}% "
                         f"| {r['last_loss']:.3f} | {r['planned_training_bytes'] / 1024:.0f} "
                         f"| {r['weight_bytes'] / 1024:.0f} |")
        gap = 100 * (rows["float"]["test_accuracy"] - rows["int8 qas"]["test_accuracy"])
        lines.append(f"| {name} | float - int8 with QAS | | {gap:+.1f} points | | | |")
    (out / "int8_digits_host.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
