"""Training memory of int8 sparse steps against unoptimized float full backprop, measured in the runner.

For MobileNetV2-w0.35@128 (10 classes) and the demo's DigitsCNN (24x24 digits), batch 1 and 8:

- float full backprop, no optimization (``O0``): the baseline;
- float sparse (the model's sparse scheme), all optimizations (``O3``);
- int8 sparse: the model quantized by ``pock_tvm.quantization.post_training`` (per-channel int8 weights, per-tensor
  int8 activations), same scheme, all optimizations: frozen layers are int8 kernels, trained
  weights float32 masters in integer units with quantization-aware scaling.

Each step is saved as a bundle and trained by the C++ runner (``pock_runner train``, 3 steps);
training memory is what the runner reports: peak RSS during the steps above the loaded bundle, plus
the optimizer state; and its data part (anonymous memory: without the pages of kernel code and
constants the first step reads in from the library file, which a microcontroller keeps in flash).
The weights (loaded with the bundle, not counted there) are listed beside it.
Inputs and calibration batches are random: memory does not depend on the values.

    python benchmarks/bench_int8_memory.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

SCHEMES = {"mobilenetv2": "tte-mbv2", "digitscnn": "digits-sparse"}  # digits-sparse: tasks.digits.sparse_scheme
COMMAND = "python benchmarks/bench_int8_memory.py --out benchmarks/results"


def _model(name: str, batch: int):
    import torch

    from pock_tvm.models import DigitsCNN, MobileNetV2

    torch.manual_seed(0)
    if name == "mobilenetv2":
        return MobileNetV2(width_mult=0.35, num_classes=10).eval(), (batch, 3, 128, 128)
    return DigitsCNN().eval(), (batch, 1, 24, 24)


def measure(name: str, batch: int, config: str, runner: Path, tmp: Path) -> dict:
    import numpy as np
    import torch

    import pock_tvm
    from pock_tvm.runtime.bundle import write_batches
    from pock_tvm.quantization.post_training import quantize
    from pock_tvm.tasks.digits import sparse_scheme

    model, shape = _model(name, batch)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype("float32")
    scheme = sparse_scheme() if SCHEMES[name] == "digits-sparse" else SCHEMES[name]
    optimizer = pock_tvm.SGD(lr=0.01, momentum=0.9)
    if config == "float full O0":
        program = pock_tvm.compile(model, (torch.from_numpy(x),), scheme="full", optimizer=optimizer, options="O0")
    elif config == "float sparse O3":
        program = pock_tvm.compile(model, (torch.from_numpy(x),), scheme=scheme, optimizer=optimizer)
    else:
        calibration = [rng.standard_normal(shape).astype("float32") for _ in range(2)]
        program = pock_tvm.compile(quantize(model, calibration, (torch.from_numpy(x),)), scheme=scheme,
                                   optimizer=optimizer)
    bundle = tmp / f"{name}-{batch}-{config.replace(' ', '_')}"
    program.save(bundle)
    data = tmp / f"{bundle.name}.bin"
    write_batches(data, program.layout, [x], rng.integers(0, 10, batch))
    result = subprocess.run([str(runner / "pock_runner"), "train", str(bundle), str(data), "--steps", "3",
                             "--no-save"], capture_output=True, text=True, timeout=900, check=True)
    fields = next(line.split() for line in result.stdout.splitlines() if line.startswith("memory "))
    values = dict(zip(fields[1::2], (int(v) for v in fields[2::2])))
    report = program.report()
    planned = report.planned
    return {"model": name, "batch": batch, "config": config,
            "scheme": "full" if "full" in config else (scheme if isinstance(scheme, str) else scheme.name),
            "runner_training_kib": values["train_peak_kib"] + values["optimizer_state_kib"],
            "runner_train_peak_kib": values["train_peak_kib"], "optimizer_state_kib": values["optimizer_state_kib"],
            "runner_data_kib": values["train_anon_kib"] + values["optimizer_state_kib"],
            "weights_kib": round(report.param_bytes / 1024),
            "planned_training_kib": round(report.training_bytes() / 1024),
            "planned_step_storage_kib": round(planned["train_step"] / 1024),
            "trainable_elements": sum(r.trainable_elements for r in report.layers)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--models", default="mobilenetv2,digitscnn")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()

    from pock_tvm.targets.runner_build import build_runner

    runner = build_runner("host")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for batch in map(int, args.batches.split(",")):
                for config in ("float full O0", "float sparse O3", "int8 sparse O3"):
                    rows.append(measure(name, batch, config, runner, Path(tmp)))
                    print(json.dumps(rows[-1]), flush=True)
    _write(Path(args.out), rows)


def _write(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8_memory_host.json").write_text(json.dumps(
        {"command": COMMAND, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    lines = ["# int8 sparse training vs float full backprop: training memory in the runner (host CPU)", "",
             f"`{COMMAND}`. Training memory: the C++ runner's peak RSS during 3 steps above the loaded "
             "bundle, plus the optimizer state (SGD momentum). Weights: the model's tensors as stored "
             "(int8 frozen, float32 trained), loaded with the bundle and not in the training column. "
             "Data: the anonymous part of the same (without the pages of kernel code and constants that the "
             "first step reads in from the library file). "
             "Planned: the compiler's static plan (step storage + largest kernel scratch + optimizer state).", "",
             "| model | batch | config | scheme | training KiB (runner) | data KiB (runner) | planned KiB "
             "| weights KiB | full O0 / this: runner | data | planned |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["batch"] == r["batch"]
                    and b["config"] == "float full O0")
        ratio = {k: base[k] / max(r[k], 1) for k in ("runner_training_kib", "runner_data_kib", "planned_training_kib")}
        lines.append(f"| {r['model']} | {r['batch']} | {r['config']} | {r['scheme']} | {r['runner_training_kib']} "
                     f"| {r['runner_data_kib']} | {r['planned_training_kib']} | {r['weights_kib']} "
                     f"| {ratio['runner_training_kib']:.1f}x | {ratio['runner_data_kib']:.1f}x "
                     f"| {ratio['planned_training_kib']:.1f}x |")
    (out / "int8_memory_host.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
