"""Federated sparse fine-tuning on Flower (``make fleet``): eight devices on loopback, each with its
own variant of the new sensor, against centralized training of the same scheme on the pooled data.
Writes ``fleet_host.json`` (the fleet's ``summary.json``) and ``fleet_host.md``.

    python benchmarks/task_fleet.py --out benchmarks/results
    python benchmarks/task_fleet.py --out benchmarks/results --from-summary out/fleet/summary.json  # no rerun
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMAND = "python benchmarks/task_fleet.py --out benchmarks/results"


def table(s: dict, date: str) -> str:
    rounds = range(1, s["rounds"] + 1)
    share = s["bytes_up_per_round"][-1] / s["full_model_bytes"]
    lines = [f"# Federated sparse fine-tuning on Flower ({s['nodes']} SuperNodes on loopback; {date})", "",
             f"`{COMMAND}` (the same run as `make fleet`)", "",
             f"Scheme (searched within {s['scheme']['budget_bytes'] / 2**20:.2f} MiB of training memory and "
             f"{s['scheme']['upload_budget_bytes'] / 2**10:.1f} KiB of upload per node and round): "
             f"{', '.join(s['scheme']['options'])}; {s['settings']['local_epochs']} local epochs per round, "
             f"Adam lr {s['settings']['optimizer']['lr']:g}.", "",
             "| round | accuracy (nodes' tests) | bytes sent by the nodes | nodes that answered |", "|---|---|---|---|",
             f"| 0 | {100 * s['initial_accuracy']:.1f}% | - | - |"]
    lines += [f"| {r} | {100 * a:.1f}% | {b / 2**10:.0f} KiB | {n} |" for r, a, b, n in
              zip(rounds, s["accuracy_per_round"], s["bytes_up_per_round"], s["nodes_per_round"])]
    lines += ["", f"- Centralized, the same scheme on the pooled data ({s['rounds'] * s['settings']['local_epochs']} "
              f"epochs): **{100 * s['centralized_accuracy']:.1f}%**; federated after {s['rounds']} rounds: "
              f"**{100 * s['final_accuracy']:.1f}%** (goal: within 2 points; "
              f"{'met' if abs(s['centralized_accuracy'] - s['final_accuracy']) <= 0.02 else 'not met'}).",
              f"- Upload per round: {s['bytes_up_per_round'][-1] / 2**10:.0f} KiB against "
              f"{s['full_model_bytes'] / 2**10:.0f} KiB for full-model FedAvg: {100 * share:.1f}% (goal: at most 10%; "
              f"{'met' if share <= 0.1 else 'not met'}).",
              f"- Wall-clock: federation {s['seconds']['federation']:.0f} s, centralized {s['seconds']['centralized']:.0f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--from-summary", type=Path, help="a fleet summary.json already made (no rerun)")
    args = parser.parse_args()
    from pock_tvm.runtime.files import write_json
    from pock_tvm.tuning import host_isa

    if args.from_summary:
        summary = json.loads(args.from_summary.read_text())
    else:
        from pock_tvm.cli.fleet import fleet

        summary = fleet(ROOT / "out" / "fleet")
    date = time.strftime("%Y-%m-%d")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "fleet_host.json", {"machine": platform.machine(), "isa": host_isa(), "command": COMMAND,
                                              "date": date, **summary})
    (args.out / "fleet_host.md").write_text(table(summary, date))
    print(table(summary, date))


if __name__ == "__main__":
    main()
