"""pock_tvm vs PyTorch eager: one training step of MobileNetV2-w0.35@128 on the host CPU.

Each measurement runs in its own process so memory is measured the same way for both:
``train memory`` = peak RSS during the steps (VmHWM, reset through /proc/self/clear_refs once
the model/program, optimizer state and batch are loaded) minus RSS at that point. Step time is the median over the timed
steps after warm-up. pock_tvm programs are compiled first, in this process, and saved.

    python benchmarks/bench_step.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_mib() -> float:
    """Current RSS, after resetting the peak (VmHWM) so that it covers only what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def _peak_mib() -> float:
    return _status_mib("VmHWM")


def _batch(batch: int):
    from pock_tvm.models.synthetic import synthetic_task

    return synthetic_task(batch, 10)


def trained_names(scheme: str) -> list[str]:
    """Parameters a scheme updates (resolved in the parent: the torch child loads no TVM)."""
    import torch

    import pock_tvm
    from pock_tvm.frontend import from_torch
    from pock_tvm.models import MobileNetV2

    model = MobileNetV2(width_mult=0.35, num_classes=10).eval()
    updates = pock_tvm.Scheme.load(scheme).resolve(from_torch(model, torch.zeros(1, 3, 128, 128)))
    return sorted(name for name, u in updates.items() if u.mode != "frozen")


def measure_torch(names: str, batch: int, warmup: int, steps: int) -> dict:
    import torch

    from pock_tvm.models import MobileNetV2  # plain torch modules; TVM is not loaded here

    trained = set(names.split(","))
    torch.manual_seed(0)
    model = MobileNetV2(width_mult=0.35, num_classes=10).eval()  # frozen BN, as pock_tvm
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    x, y = (torch.from_numpy(a) for a in _batch(batch))
    base = _rss_mib()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"step_ms": 1e3 * statistics.median(times), "rss_loaded_mib": base,
            "train_mib": _peak_mib() - base, "threads": torch.get_num_threads()}


def _run_child(args: list[str], warmup: int = 3, steps: int = 20) -> dict:
    """``["pock_tvm", bundle, batch]`` runs the C++ runner (TVM runtime only, no Python or compiler);
    ``["torch", scheme, batch]`` a Python process with torch only."""
    if args[0] == "pock_tvm":
        return measure_runner(args[1], int(args[2]), warmup, steps)
    out = subprocess.run([sys.executable, __file__, "--child", *args, "--warmup", str(warmup),
                          "--steps", str(steps)], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


@functools.cache
def _host_runner() -> Path:
    """The runner built from this checkout's sources (incremental), never a stale binary."""
    from pock_tvm.targets.runner_build import build_runner

    return build_runner("host") / "pock_runner"


def measure_runner(bundle: str, batch: int, warmup: int, steps: int) -> dict:
    """Step time and training memory of ``pock_runner train``."""
    from pock_tvm.runtime.bundle import read_manifest, write_batches
    from pock_tvm.runtime.layout import Layout

    runner = _host_runner()
    layout = Layout.from_json(read_manifest(Path(bundle))["layout"])
    x, y = _batch(batch)
    data = Path(bundle).with_suffix(".data.bin")
    write_batches(data, layout, [x], y)
    out = subprocess.run([str(runner), "train", bundle, str(data), "--steps", str(warmup + steps), "--no-save"],
                         capture_output=True, text=True, check=True).stdout
    times = [float(line.split()[5]) for line in out.splitlines() if line.startswith("step ")][warmup:]
    loaded, peak = next(line.split()[2::2] for line in out.splitlines() if line.startswith("memory "))
    return {"step_ms": statistics.median(times), "rss_loaded_mib": int(loaded) / 1024,
            "train_mib": int(peak) / 1024, "process": "pock_runner (TVM runtime only)"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--schemes", default="full,tte-mbv2")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", nargs="*")
    args = parser.parse_args()
    if args.child:
        _, names, batch = args.child  # ["torch", names, batch]: the pock_tvm side runs in pock_runner
        print(json.dumps(measure_torch(names, int(batch), args.warmup, args.steps)))
        return

    import torch
    import tvm

    import pock_tvm
    from pock_tvm.models import MobileNetV2

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes.split(","):
            for batch in map(int, args.batches.split(",")):
                torch.manual_seed(0)
                model = MobileNetV2(width_mult=0.35, num_classes=10)
                start = time.perf_counter()
                program = pock_tvm.compile(model, (torch.zeros(batch, 3, 128, 128),), scheme=scheme,
                                           optimizer=pock_tvm.SGD(lr=0.05, momentum=0.9))
                compile_s = time.perf_counter() - start
                path = Path(tmp) / f"{scheme}-{batch}"
                program.save(path)
                report = program.report()
                ours = _run_child(["pock_tvm", str(path), str(batch)], args.warmup, args.steps)
                theirs = _run_child(["torch", ",".join(trained_names(scheme)), str(batch)], args.warmup, args.steps)
                rows.append({"scheme": scheme, "batch": batch, "compile_s": round(compile_s, 1),
                             "pock_tvm": ours, "torch": theirs,
                             "backward_flops": report.sparse["backward_flops"],
                             "saved_activation_bytes": report.sparse["saved_activation_bytes"]})
                print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/bench_step.py --out " + args.out,
            "model": "MobileNetV2 width 0.35, 128x128, 10 classes, frozen BN, SGD momentum 0.9",
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                       f"{os.cpu_count()} cores",
            "torch": torch.__version__, "tvm": tvm.__version__,
            "date": time.strftime("%Y-%m-%d")}
    (out / "step_mbv2_host.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# MobileNetV2-w0.35@128, training step on the host CPU ({meta['date']})", "",
             f"`{meta['command']}` on {meta['machine']}; torch {meta['torch']}, TVM {meta['tvm']}.",
             "pock_tvm kernels are untuned (no MetaSchedule yet). Memory: peak RSS during the steps "
             "minus RSS with model, optimizer state and batch loaded, each framework in its own process: "
             "pock_tvm in the C++ `pock_runner` (TVM runtime only), torch in Python with torch only.",
             "", "| scheme | batch | pock_tvm step ms | torch step ms | pock_tvm train MiB | torch train MiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['batch']} | {r['pock_tvm']['step_ms']:.1f} | "
                     f"{r['torch']['step_ms']:.1f} | {r['pock_tvm']['train_mib']:.1f} | "
                     f"{r['torch']['train_mib']:.1f} |")
    lines += ["", "torch runs the same scheme by freezing parameters (requires_grad=False); it cannot "
              "slice a weight gradient, so partially updated weights get a full gradient there."]
    (out / "step_mbv2_host.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
