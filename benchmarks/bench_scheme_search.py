"""The demo's result as a committed benchmark: searched scheme vs full fine-tuning on the digits task.

    python benchmarks/bench_scheme_search.py --out benchmarks/results

Runs the demo (``pock_tvm.cli.demo``: contribution analysis, search within a quarter of full
fine-tuning's planned memory, fine-tunes, memory measured by the C++ runner, rpi4 under qemu), then
repeats the final fine-tunes of the searched scheme and of full fine-tuning with two more shuffling
seeds, and writes ``scheme_search_digits_host.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

from pock_tvm.compiler.step import compile
from pock_tvm.cli.demo import DemoSettings, demo
from pock_tvm.training.finetune import accuracy, fit
from pock_tvm.runtime.files import write_json
from pock_tvm.scheme import Scheme

SEEDS = (1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--demo-out", default="out/demo")
    args = parser.parse_args()
    settings = DemoSettings()
    summary = demo(args.demo_out, settings)

    import torch

    from pock_tvm.frontend import import_model
    from pock_tvm.cache import cache_dir
    from pock_tvm.tasks.digits import load_task, pretrained

    task = load_task()
    imported = import_model(pretrained(cache_dir() / "demo"), (torch.zeros(settings.batch, 1, 24, 24),))
    schemes = {"searched": Scheme.from_dict(summary["searched"]["scheme"]), "full": Scheme.preset("full")}
    seeds = {name: {settings.seed: summary["schemes"][name]["test_accuracy"]} for name in schemes}
    for seed in SEEDS:
        for name, scheme in schemes.items():
            program = compile(imported, scheme=scheme, optimizer=settings.optimizer)
            fit(program, *task.labelled, settings.epochs, seed)
            seeds[name][seed] = accuracy(program, *task.test)
            print(f"seed {seed} {name}: test accuracy {100 * seeds[name][seed]:.1f}%")
    result = {"command": "python benchmarks/bench_scheme_search.py --out benchmarks/results",
              "machine": platform.machine(), "summary": summary,
              "test_accuracy_by_seed": {n: {str(k): v for k, v in s.items()} for n, s in seeds.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "scheme_search_digits_host.json", result)
    (out / "scheme_search_digits_host.md").write_text(_markdown(result))
    print(_markdown(result))


def _markdown(result: dict) -> str:
    s = result["summary"]
    rows = s["schemes"]
    mib = 2**20
    lines = ["# Scheme search on the digits task (host)", "",
             f"Command: `{result['command']}` (runs `make demo`'s job, then two more seeds of the final fine-tunes).",
             "", f"Task: {s['task']['labelled']} labelled digits through a new sensor "
             f"({json.dumps(s['task']['sensor'])}), {s['task']['test']} held out; DigitsCNN pretrained on clean "
             f"digits. Budget: {s['settings']['budget_fraction']} of full fine-tuning's planned training memory "
             f"({s['full_planned_bytes'] / mib:.2f} MiB) = {s['budget_bytes'] / mib:.2f} MiB. Searched updates: "
             f"{', '.join(s['searched']['options'])} ({s['searched']['method']}).", "",
             "| scheme | test accuracy (seed 0) | training memory, runner | planned | step (host) |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        measured = f"{r['measured_training_kib'] / 1024:.2f} MiB" if r["measured_training_kib"] else "-"
        planned = f"{r['planned_training_bytes'] / mib:.2f} MiB" if r["planned_training_bytes"] else "-"
        step = f"{r['median_step_ms']:.1f} ms" if r["median_step_ms"] is not None else "-"
        lines.append(f"| {name} | {100 * r['test_accuracy']:.1f}% | {measured} | {planned} | {step} |")
    lines += ["", "| scheme | test accuracy by shuffling seed | mean |", "|---|---|---|"]
    for name, by_seed in result["test_accuracy_by_seed"].items():
        values = list(by_seed.values())
        lines.append(f"| {name} | {', '.join(f'{100 * v:.1f}%' for v in values)} | "
                     f"{100 * statistics.mean(values):.1f}% |")
    full, searched = rows["full"]["measured_training_kib"], rows["searched"]["measured_training_kib"]
    board = s["board"]
    lines += ["", f"Searched / full measured training memory: {searched / full:.3f} ({full / searched:.1f}x less).",
              f"Emulated rpi4: {board.get('skipped') or 'losses ' + ', '.join(f'{v:.5f}' for v in board['losses'])}"
              + ("" if "skipped" in board else f" (host {', '.join(f'{v:.5f}' for v in board['host_losses'])}, "
                 f"largest relative difference {board['max_relative_difference']:.1e})"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
