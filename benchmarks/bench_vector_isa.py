"""Vector width and register tiles by ISA: the rows of ``pock_tvm.passes.cpu_rules.ISAS``.

Compiles each step for one ISA (``--mcpu``, default ``haswell``: AVX2 code, which runs on any AVX2 or
AVX-512 CPU) with candidate rows of the table (lanes of a vector loop, the channel-vectorized
rule's vector and accumulators), default schedules only (no tuning database), and times them
alternating in one process. Decides that ISA's row.

    python benchmarks/bench_vector_isa.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

from bench_kernels import ROOT, _timed  # noqa: F401  (ROOT puts the project on sys.path)

# candidate rows: (lanes, channel_lanes, accumulators)
CANDIDATES = {"16/16/16 (the AVX-512 row)": (16, 16, 16), "16/8/12": (16, 8, 12), "8/8/12": (8, 8, 12)}


def _encoder():
    import torch.nn as nn

    class Encoder(nn.Module):  # a MiniLM-sized 2-layer BERT encoder with a classifier head
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(1000, 384)
            self.layers = nn.Sequential(*[nn.TransformerEncoderLayer(384, 6, 1536, batch_first=True)
                                          for _ in range(2)])
            self.head = nn.Linear(384, 5)

        def forward(self, x):
            return self.head(self.layers(self.emb(x)).mean(1))

    return Encoder()


def _cases():
    import torch

    from pock_tvm.models import MobileNetV2, ResNet18

    return [("MobileNetV2-w0.35@128", lambda: MobileNetV2(width_mult=0.35, num_classes=10),
             torch.randn(8, 3, 128, 128), 10),
            ("ResNet-18@64", lambda: ResNet18(num_classes=10), torch.randn(8, 3, 64, 64), 10),
            ("encoder 2x384, seq 128", _encoder, torch.randint(0, 1000, (4, 128)), 5)]


def measure(mcpu: str, rounds: int, steps: int) -> list[dict]:
    import torch

    import pock_tvm
    from pock_tvm.passes.cpu_rules import cpu as cpu_table
    from pock_tvm.targets import PRESETS

    target = dataclasses.replace(PRESETS["host"], tvm_target={"kind": "llvm", "mcpu": mcpu})
    of = cpu_table.CPU.of
    rows = []
    for name, make, x, classes in _cases():
        y = torch.randint(0, classes, (x.shape[0],)).numpy()
        programs = {}
        for label, (lanes, channel_lanes, accumulators) in CANDIDATES.items():
            row = dict(lanes=lanes, channel_lanes=channel_lanes, accumulators=accumulators)
            cpu_table.CPU.of = staticmethod(lambda t=None, **o: dataclasses.replace(of(t, **o), **row))
            try:
                torch.manual_seed(0)
                programs[label] = pock_tvm.compile(make().eval(), (x,), scheme="full", target=target,
                                                   baseline=False, tuning_database=False)
            finally:
                cpu_table.CPU.of = of
        times = {label: [] for label in programs}
        for program in programs.values():
            program.step(x.numpy(), y)
        for _ in range(rounds):
            for label, program in programs.items():
                times[label] += _timed(lambda p=program: p.step(x.numpy(), y), steps)
        rows.append({"model": name, "batch": int(x.shape[0]), "scheme": "full",
                     "step_ms": {k: round(statistics.median(v), 2) for k, v in times.items()}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--mcpu", default="haswell")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import tvm

    from pock_tvm.targets.toolchain import system_cpu

    rows = measure(args.mcpu, args.rounds, args.steps)
    command = f"python benchmarks/bench_vector_isa.py --mcpu {args.mcpu} --out {args.out}"
    meta = {"command": command, "machine": f"{platform.machine()} {system_cpu()}, {os.cpu_count()} cores",
            "tvm": tvm.__version__, "date": time.strftime("%Y-%m-%d"), "mcpu": args.mcpu,
            "threads": os.environ.get("TVM_NUM_THREADS", "all"), "rounds": args.rounds, "steps_per_round": args.steps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"vector_isa_{args.mcpu}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    labels = list(CANDIDATES)
    lines = [f"# Vector width and register tiles for `-mcpu={args.mcpu}` ({meta['date']})", "",
             f"`{command}` on {meta['machine']}, TVM {meta['tvm']}. Each training step (full fine-tuning, "
             f"SGD) compiled for `{args.mcpu}` with default schedules (no tuning database) and each candidate "
             "row of `pock_tvm.passes.cpu_rules.ISAS`: lanes of a vector loop / lanes of the channel-vectorized "
             f"rule's vector / its accumulators. Alternating in one process ({args.rounds} rounds of {args.steps} "
             "steps, median ms).", "",
             "| model | batch | " + " | ".join(f"{label} ms" for label in labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(f"{r['step_ms'][k]:.1f}" for k in labels) + " |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
