"""The old synthetic demo, kept as a benchmark: compile MobileNetV2-w0.35@128 for a sparse fine-tune
(tte-mbv2) and time steps on random tensors with a per-class colour tint (nothing real is learned).

    python benchmarks/bench_synthetic_demo.py [--steps 20] [--batch 8] [--scheme tte-mbv2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pock_tvm
from pock_tvm.models import MobileNetV2
from pock_tvm.models.synthetic import synthetic_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--scheme", default="tte-mbv2")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = MobileNetV2(width_mult=0.35, num_classes=10)
    start = time.perf_counter()
    program = pock_tvm.compile(model, (torch.zeros(args.batch, 3, 128, 128),), scheme=args.scheme,
                               optimizer=pock_tvm.SGD(lr=args.lr, momentum=0.9))
    compile_s = time.perf_counter() - start
    print(program.report())
    x, y = synthetic_task(args.batch, 10)
    losses, times = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        losses.append(program.step(x, y))
        times.append(time.perf_counter() - t0)
        print(f"step {i:3d}  loss {losses[-1]:.4f}  {1e3 * times[-1]:.1f} ms")
    print(f"\ncompiled in {compile_s:.1f} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}; median step "
          f"{1e3 * statistics.median(times[1:] or times):.1f} ms (batch {args.batch}, host CPU)")


if __name__ == "__main__":
    main()
