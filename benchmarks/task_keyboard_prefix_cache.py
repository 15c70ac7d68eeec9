"""Smart keyboard with the frozen-prefix cache: SmolLM2-135M, last 2 decoder layers (and the final
norm) fine-tuned on one writer's text for several epochs, wall-clock and held-out perplexity of
pock_tvm (prefix cache in float32 and int8, and without the cache) against PyTorch eager doing the
same fine-tune (same trainable tensors, Adam, learning rate, batches and order).

Wall-clock counts everything a fine-tune runs after compilation: for pock_tvm the prefix pass that
fills the cache and every step; compile time is its own column. The runs follow each other in one
process (not alternating: each is minutes long), so compare them on an otherwise idle machine.

    python benchmarks/task_keyboard_prefix_cache.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MIB = 1 << 20


def torch_fine_tune(model, train, trained: set[str], lr: float, epochs: int, seed: int) -> tuple[float, list[float]]:
    """Wall-clock seconds and losses of PyTorch eager running ``fit``'s schedule (batch 1, the same
    shuffled order per epoch) on the parameters named in ``trained``."""
    import numpy as np
    import torch

    from bench_llm_step import torch_trainer

    step, _ = torch_trainer(model, {}, trained, lr)
    rng = np.random.default_rng(seed)
    losses = []
    start = time.perf_counter()
    for _ in range(epochs):
        for i in rng.permutation(len(train.ids)):
            ids = torch.from_numpy(train.ids[i:i + 1])
            losses.append(step(ids, torch.from_numpy(train.mask[i:i + 1]), torch.from_numpy(train.labels[i:i + 1])))
    return time.perf_counter() - start, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--category", default="tech")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--train-sequences", type=int, default=64)
    parser.add_argument("--test-sequences", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="float32,int8,none,torch",
                        help="which fine-tunes: prefix-cache storages, 'none' (no cache), 'torch'")
    args = parser.parse_args()

    import numpy as np
    import torch

    import pock_tvm
    from pock_tvm.frontend import import_model
    from pock_tvm.runtime.files import write_json
    from pock_tvm.scheme import Scheme
    from pock_tvm.training.finetune import fit
    from pock_tvm.tuning import host_isa
    from task_keyboard import evaluate, load_task

    model, train, test, word_start = load_task(args)
    before = evaluate(model, test, word_start)
    print("before", before, flush=True)
    scheme = Scheme.preset("last-2")
    imported = import_model(model, (torch.from_numpy(train.ids[:1]), torch.from_numpy(train.mask[:1])))
    start = time.perf_counter()
    program = pock_tvm.compile(imported, scheme=scheme, loss="next_token", optimizer=pock_tvm.Adam(lr=args.lr),
                               prefix_cache=True)
    compile_s = time.perf_counter() - start
    initial = program.state_dict()
    trained = {p.source for p in program.layout.params if p.trainable}
    report = program.report()
    rows = []
    for run in args.runs.split(","):
        row = {"run": run, "epochs": args.epochs}
        if run == "torch":
            tuned = copy.deepcopy(model)
            seconds, losses = torch_fine_tune(tuned, train, trained, args.lr, args.epochs, args.seed)
            tuned.eval()
        else:
            program.load_state_dict(initial)  # the same start for every run (folded tensors are unchanged)
            program.reset_optimizer()
            start = time.perf_counter()
            result = fit(program, (train.ids, train.mask), train.labels, args.epochs, args.seed,
                         prefix_cache=None if run == "none" else run)
            seconds, losses = time.perf_counter() - start, result.losses
            row.update(prefix_s=round(result.prefix_s, 1), cache_mib=round(result.cache_bytes / MIB, 1),
                       compile_s=round(compile_s, 1),
                       step_ms=round(result.median_step_ms, 1))
            tuned = copy.deepcopy(model)
            tuned.load_state_dict({k: torch.from_numpy(v) for k, v in program.state_dict().items()}, strict=False)
        row.update(wall_s=round(seconds, 1), first_loss=round(losses[0], 3),
                   last_losses=round(float(np.mean(losses[-16:])), 3), **evaluate(tuned, test, word_start))
        print(row, flush=True)
        rows.append(row)
    torch_s = next((r["wall_s"] for r in rows if r["run"] == "torch"), None)
    for r in rows:
        r["speedup_vs_torch"] = round(torch_s / r["wall_s"], 2) if torch_s and r["run"] != "torch" else None
    command = "python benchmarks/task_keyboard_prefix_cache.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"machine": platform.machine(), "isa": host_isa(), "cores": os.cpu_count(), "command": command,
            "date": time.strftime("%Y-%m-%d"), "train_sequences": len(train.ids), "length": args.length,
            "lr": args.lr, "before": before, "trainable": sum(r.trainable_elements for r in report.layers),
            "planned_mib": {k: round(v / MIB, 1) for k, v in report.planned.items() if k != "cached_bytes_per_sample"},
            "cached_bytes_per_sample": report.planned.get("cached_bytes_per_sample"), "rows": rows}
    write_json(args.out / "keyboard_prefix_cache_host.json", data)
    text = _table(data)
    (args.out / "keyboard_prefix_cache_host.md").write_text(text)
    print(text)


def _table(data: dict) -> str:
    names = {"float32": "pock_tvm, prefix cache float32", "int8": "pock_tvm, prefix cache int8",
             "float16": "pock_tvm, prefix cache float16", "none": "pock_tvm, no cache", "torch": "PyTorch eager"}
    lines = [f"# Smart keyboard, last-2 with the frozen-prefix cache: SmolLM2-135M on the host CPU "
             f"({data['isa']}, {data['cores']} cores; {data['date']})\n",
             f"`{data['command']}`\n",
             f"{data['train_sequences']} training sequences of {data['length']} tokens, "
             f"{data['rows'][0]['epochs']} epochs at batch 1, Adam (lr {data['lr']}), the last 2 decoder layers and "
             f"the final norm trained ({data['trainable'] / 1e6:.2f} M). Held-out perplexity before: "
             f"{data['before']['perplexity']}.\n",
             "| fine-tune | wall-clock | vs PyTorch | prefix pass | step (median) | cache | perplexity | "
             "next-word top-1 |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {names.get(r['run'], r['run'])} | {r['wall_s']} s | "
                     f"{str(r['speedup_vs_torch']) + 'x' if r.get('speedup_vs_torch') else '-'} | "
                     f"{str(r['prefix_s']) + ' s' if r.get('prefix_s') else '-'} | "
                     f"{str(r['step_ms']) + ' ms' if 'step_ms' in r else '-'} | "
                     f"{str(r['cache_mib']) + ' MiB' if r.get('cache_mib') else '-'} | {r['perplexity']} | "
                     f"{100 * r['next_word_top1']:.1f}% |")
    planned = data["planned_mib"]
    lines.append(f"\nPlanned memory (MiB): step {planned.get('train_step')}, step from the cache "
                 f"{planned.get('train_step_cached')}, prefix {planned.get('prefix')}; cache "
                 f"{data['cached_bytes_per_sample'] / 1024:.0f} KiB per sample in float32. Compile time (both steps "
                 f"and the prefix): {data['rows'][0].get('compile_s', '-')} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
