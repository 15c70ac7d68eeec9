"""Smart keyboard: SmolLM2-135M adapts on the device to one writer's text (the BBC News 'tech'
articles, split by article: 80% to train on, 20% held out) with pock_tvm; held-out perplexity,
next-token and next-word top-1 accuracy before and after, for a sparse scheme, LoRA and full
fine-tuning, with each step's training memory and tokens/s.

Next-word accuracy counts the positions where the true next token starts a word (its text begins
with a space): what a keyboard suggests. Evaluation runs the fine-tuned weights in torch (the same
parameters: the tests check pock_tvm's updates against autograd), LoRA merged into its layers.

    python benchmarks/task_keyboard.py --out benchmarks/results

``--alternate RESULTS.json`` times the steps of that run's schemes against each other instead:
each is compiled again (the searched one from its saved scheme), then one step of each in turn on
one training sequence, round after round, the order reversed every other round, in one process (only ratios hold on a shared
machine); the medians and the per-round ratios go into the JSON, and its table is written again.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 1 << 20


def schemes():
    from pock_tvm.scheme import Rule, Scheme

    return {
        # every RMSNorm, the last 3 decoder layers and the final norm (3.3% of the weights)
        "sparse": (Scheme("sparse", norm_affine=True, rules=[Rule("@last-blocks:4", "full")]), 1e-4),
        "lora": (Scheme.preset("lora"), 1e-3),  # rank 8 on q/k/v/o of every layer
        "full": (Scheme.preset("full"), 2e-5),
    }


def subset(split, rows):
    from pock_tvm.tasks.bbc_news import Split

    return Split(split.ids[rows], split.mask[rows], split.labels[rows])


def evaluate(model, split, word_start, batch: int = 8) -> dict:
    """Held-out perplexity, next-token and next-word top-1 accuracy of a torch causal LM."""
    import numpy as np
    import torch

    nll, hits, words, word_hits, count = 0.0, 0, 0, 0, 0
    with torch.no_grad():
        for i in range(0, len(split.ids), batch):
            ids, mask = torch.from_numpy(split.ids[i:i + batch]), torch.from_numpy(split.mask[i:i + batch])
            logits = model(ids, mask)[:, :-1]
            labels = torch.from_numpy(split.labels[i:i + batch])[:, 1:]
            keep = labels != -100
            target = labels.clamp(min=0)
            logp = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            nll -= float(logp[keep].sum())
            right = (logits.argmax(-1) == target) & keep
            starts = torch.from_numpy(word_start)[target] & keep
            hits += int(right.sum())
            count += int(keep.sum())
            words += int(starts.sum())
            word_hits += int((right & starts).sum())
    return {"perplexity": round(float(np.exp(nll / count)), 3), "next_token_top1": round(hits / count, 4),
            "next_word_top1": round(word_hits / words, 4), "tokens": count}


def load_task(args):
    """``(model, train, test, word_start)``: SmolLM2 as a causal LM returning logits, the writer's
    training and held-out sequences (``args``: category, length, seed, train/test_sequences) and
    which token ids start a word."""
    import numpy as np

    from pock_tvm.models.hf import CausalLMLogits, smollm2
    from pock_tvm.tasks import bbc_news

    lm, tokenizer = smollm2()
    train, test = bbc_news.writer_sequences(tokenizer, args.category, args.length, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    train = subset(train, rng.permutation(len(train.ids))[:args.train_sequences])
    test = subset(test, rng.permutation(len(test.ids))[:args.test_sequences])
    vocab = tokenizer.convert_ids_to_tokens(list(range(lm.config.vocab_size)))
    word_start = np.array([t.startswith(("Ġ", " ", "▁")) for t in vocab])
    return CausalLMLogits(lm).eval(), train, test, word_start


def search(imported, train, args):
    """The scheme search on the writer's training text (``--search-*``): within a quarter of full
    fine-tuning's planned memory and no slower than LoRA's step (the search times the chosen
    scheme's compiled step alternately with LoRA's)."""
    import pock_tvm
    from pock_tvm.scheme import Scheme
    from pock_tvm.search import AnalysisSettings
    from pock_tvm.search.scheme_search import progress_bar, search_scheme

    settings = AnalysisSettings(epochs=1, optimizer=pock_tvm.Adam(lr=args.search_lr), loss="next_token",
                                samples=args.search_samples, last_blocks=args.search_last_blocks,
                                time_budget_s=args.search_time_budget, seed=args.seed)
    budget = int(args.full_training_mib * MIB / 4)
    data = ((train.ids, train.mask), train.labels)
    result = search_scheme(imported, *data, batch=1, budget=budget, latency_of=Scheme.preset("lora"),
                           settings=settings, cache_dir=ROOT / "out" / "search-keyboard", seed=args.seed,
                           progress=progress_bar())
    print(result.table(), flush=True)
    return result


def alternate(path: Path, args) -> None:
    """Step times of the schemes of the run in ``path`` (its ``scheme_toml`` for the searched one,
    the presets for the others), one step each per round (``--rounds``, ``step_check.time_steps``)
    on the first training sequence; written into that JSON as ``alternating`` and into its table."""
    import json
    import statistics
    import tomllib

    import torch

    import pock_tvm
    from pock_tvm.frontend import import_model
    from pock_tvm.runtime.files import write_json
    from pock_tvm.scheme import Scheme
    from pock_tvm.search.step_check import time_steps

    data = json.loads(path.read_text())
    model, train, _, _ = load_task(args)
    imported = import_model(model, (torch.from_numpy(train.ids[:1]), torch.from_numpy(train.mask[:1])))
    programs = {}
    for row in data["rows"][1:]:
        scheme = (Scheme.from_dict(tomllib.loads(row["scheme_toml"])) if "scheme_toml" in row
                  else schemes()[row["scheme"]][0])
        programs[row["scheme"]] = pock_tvm.compile(imported, scheme=scheme, loss="next_token",
                                                   optimizer=pock_tvm.Adam(lr=row["lr"]))
    batch = (train.ids[:1], train.mask[:1], train.labels[:1])
    times = dict(zip(programs, time_steps(list(programs.values()), batch, args.rounds)))
    names = list(programs)
    result = {"rounds": args.rounds, "median_ms": {n: round(statistics.median(t), 1) for n, t in times.items()}}
    if len(names) == 2:
        ratios = sorted(a / b for a, b in zip(times[names[0]], times[names[1]]))
        result["ratio"] = f"{names[0]} / {names[1]}"
        result["ratio_median"] = round(statistics.median(ratios), 3)
        result["ratio_quartiles"] = [round(ratios[len(ratios) // 4], 3), round(ratios[(3 * len(ratios)) // 4], 3)]
    result["command"] = "python benchmarks/task_keyboard.py " + " ".join(sys.argv[1:])
    result["date"] = time.strftime("%Y-%m-%d")
    print(result, flush=True)
    data["alternating"] = result
    write_json(path, data)
    path.with_suffix(".md").write_text(markdown(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--schemes", default="sparse,lora,full", help="of sparse, lora, full and searched")
    parser.add_argument("--name", default="keyboard_smollm2_host", help="the results' file name (.json, .md)")
    parser.add_argument("--category", default="tech")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--train-sequences", type=int, default=64, help="sequences of the training split used")
    parser.add_argument("--test-sequences", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-training-mib", type=float, default=1820.8,
                        help="full fine-tuning's planned training memory (the searched scheme's budget is a "
                             "quarter of it); the compiler's plan, the same on every x86 host")
    parser.add_argument("--search-samples", type=int, default=16, help="training sequences per option's fine-tune")
    parser.add_argument("--search-last-blocks", type=int, default=6)
    parser.add_argument("--search-lr", type=float, default=3e-4, help="Adam rate of each option's short fine-tune")
    parser.add_argument("--searched-lr", type=float, default=None,
                        help="Adam rate of the searched scheme's fine-tune (default: --search-lr)")
    parser.add_argument("--search-time-budget", type=float, default=None, help="seconds")
    parser.add_argument("--markdown", type=Path, help="only write the table of this results .json again")
    parser.add_argument("--alternate", type=Path, help="time this results .json's schemes' steps alternately")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of --alternate (one step per scheme each)")
    args = parser.parse_args()
    if args.alternate is not None:
        alternate(args.alternate, args)
        return
    if args.markdown is not None:
        import json

        args.markdown.with_suffix(".md").write_text(markdown(json.loads(args.markdown.read_text())))
        return

    import numpy as np
    import torch

    import pock_tvm
    from pock_tvm.adapters import merge_lora
    from pock_tvm.frontend import import_model
    from pock_tvm.training.finetune import fit
    from pock_tvm.runtime.files import write_json

    model, train, test, word_start = load_task(args)
    before = evaluate(model, test, word_start)
    print("before", before, flush=True)
    imported = import_model(model, (torch.from_numpy(train.ids[:1]), torch.from_numpy(train.mask[:1])))
    rows = [{"scheme": "no update", **before}]
    searched = None
    for name in args.schemes.split(","):
        if name == "searched":
            searched = search(imported, train, args)
            scheme, lr = searched.scheme, args.searched_lr or args.search_lr
        else:
            scheme, lr = schemes()[name]
        start = time.perf_counter()
        program = pock_tvm.compile(imported, scheme=scheme, loss="next_token", optimizer=pock_tvm.Adam(lr=lr))
        compile_s = time.perf_counter() - start
        result = fit(program, (train.ids, train.mask), train.labels, args.epochs, args.seed)
        state = program.state_dict()
        if scheme.lora is not None:
            state = merge_lora(state, scheme.lora)
        tuned = copy.deepcopy(model)
        tuned.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
        report = program.report()
        row = {"scheme": name, **evaluate(tuned, test, word_start),
               "trainable": sum(r.trainable_elements for r in report.layers), "lr": lr,
               "training_memory_mib": round(report.training_bytes() / MIB, 1),
               "step_ms": round(result.median_step_ms, 1),
               "tokens_per_s": round(args.length / (result.median_step_ms / 1e3), 1),
               "compile_s": round(compile_s, 1), "first_loss": round(result.losses[0], 3),
               "last_losses": round(float(np.mean(result.losses[-8:])), 3)}
        if name == "searched":
            row["analysis_s"] = round(searched.analysis.seconds, 1)
            row["scheme_toml"] = scheme.to_toml()
            row["search_table"] = searched.table()
            if searched.step is not None:
                row["search_step_check"] = searched.step.to_json()
        print(row, flush=True)
        rows.append(row)
        del program
    command = "python benchmarks/task_keyboard.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"machine": platform.machine(), "command": command, "train_sequences": len(train.ids),
            "test_sequences": len(test.ids), "length": args.length, "epochs": args.epochs, "rows": rows}
    write_json(args.out / f"{args.name}.json", data)
    (args.out / f"{args.name}.md").write_text(markdown(data))
    print(markdown(data))


def markdown(data: dict) -> str:
    """The results table of a run's JSON (``--markdown FILE.json`` writes it again, with the
    JSON's ``notes``: lines a person added about the run)."""
    rows = data["rows"]
    lines = ["# Smart keyboard: SmolLM2-135M adapted to one writer (BBC News 'tech') by pock_tvm on the host CPU\n",
             f"`{data['command']}`\n",
             f"{data['train_sequences']} training sequences of {data.get('length', 128)} tokens, "
             f"{data.get('epochs', 2)} epochs at batch 1 (Adam); {rows[0]['tokens']} held-out tokens from other "
             "articles.\n",
             "| scheme | trainable | perplexity | next-token top-1 | next-word top-1 | training memory (planned) | "
             "tokens/s (step) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r.get('trainable', 0) / 1e6:.2f} M | {r['perplexity']} | "
                     f"{100 * r['next_token_top1']:.1f}% | {100 * r['next_word_top1']:.1f}% | "
                     f"{r.get('training_memory_mib', '-')} MiB | {r.get('tokens_per_s', '-')} |")
    if "alternating" in data:
        alt = data["alternating"]
        medians = ", ".join(f"{name} {ms} ms" for name, ms in alt["median_ms"].items())
        lines += ["", f"Steps timed alternately ({alt['rounds']} rounds of one step per scheme, one process, "
                  f"{alt['date']}; `{alt['command']}`): median {medians}"
                  + (f"; per-round {alt['ratio']} median {alt['ratio_median']} (quartiles "
                     f"{alt['ratio_quartiles'][0]}-{alt['ratio_quartiles'][1]})." if "ratio" in alt else ".")]
    if data.get("notes"):
        lines += ["", *data["notes"]]
    for r in rows:
        if "search_table" in r:
            lines += ["", f"Searched scheme (analysis {r['analysis_s']:.0f} s; learning rate {r['lr']:g}):", "",
                      "```", r["search_table"], "```", "", "```toml", r["scheme_toml"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
