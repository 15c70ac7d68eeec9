"""SmolLM2-135M training step: pock_tvm against PyTorch eager with the same trainable set, alternating
in one process (only ratios hold on a noisy shared machine), on the host CPU.

Time: median of the timed steps (tokens/s = batch x sequence / step time). Training memory (what a
step adds to the model's weights): pock_tvm's static plan (step storage + kernel scratch +
optimizer state; the C++ runner measured within 10% of it on the demo CNN); PyTorch's counted during
one step: the tensors autograd saves for backward (distinct storages), the gradients and Adam's
two moments, so transient intermediates are left out of PyTorch's side.

    python benchmarks/bench_llm_step.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 1 << 20


def torch_trainer(model, state: dict, trained: set[str], lr: float, lora=None, compiled: bool = False):
    """``(step, bytes)``: one Adam step of ``model`` on the parameters named in ``trained`` (with
    ``lora``, the program's adapters are added from ``state``); ``bytes()`` counts a step's
    training memory. ``compiled``: the model runs through ``torch.compile`` (inductor, CPU)."""
    import torch

    from pock_tvm.models.lora import with_lora

    if lora is not None:
        model = with_lora(model, state, lora.scale)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
        if p.requires_grad:
            params.append(p)
    missing = trained - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"torch side has no parameters {sorted(missing)[:3]}")
    opt = torch.optim.Adam(params, lr=lr)
    forward = torch.compile(model) if compiled else model

    def loss_of(ids, mask, labels):
        logits = forward(ids, mask)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=-100)

    def step(ids, mask, labels):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(ids, mask, labels)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def bytes_(ids, mask, labels):
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_of(ids, mask, labels)
        loss.backward()
        grads = sum(p.grad.nbytes for p in params)
        opt.zero_grad(set_to_none=True)
        return sum(saved.values()) + grads + 2 * sum(p.nbytes for p in params)

    return step, bytes_


def measure(model, scheme: str, batch: int, seq: int, rounds: int, lr: float = 1e-5, peers: bool = True) -> dict:
    import numpy as np
    import torch

    import pock_tvm
    from pock_tvm.models.hf import CausalLMLogits
    from pock_tvm.scheme import Scheme

    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, model.config.vocab_size, (batch, seq)).astype("int64"))
    mask = torch.ones_like(ids)
    wrapped = CausalLMLogits(model).eval()
    start = time.perf_counter()
    program = pock_tvm.compile(wrapped, (ids, mask), scheme=scheme, loss="next_token", optimizer=pock_tvm.Adam(lr=lr))
    compile_s = time.perf_counter() - start
    state = program.state_dict()
    trained = {p.source for p in program.layout.params if p.trainable}
    lora = Scheme.from_dict(program.layout.scheme).lora  # the adapters' rank and alpha, as compiled
    t_step, t_bytes = torch_trainer(wrapped, state, trained, lr, lora)
    c_step = None
    if peers:  # torch.compile: its own copy of the model (the eager one keeps its parameters)
        import copy

        c_step, _ = torch_trainer(copy.deepcopy(wrapped), state, trained, lr, lora, compiled=True)
        start = time.perf_counter()
        c_step(ids, mask, ids)
        inductor_s = time.perf_counter() - start
    args = (ids.numpy(), mask.numpy(), ids.numpy())
    ours, theirs, compiled = [], [], []
    program.step(*args), t_step(ids, mask, ids)  # warm-up
    if c_step is not None:
        c_step(ids, mask, ids)
    for _ in range(rounds):
        start = time.perf_counter()
        program.step(*args)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        t_step(ids, mask, ids)
        theirs.append(time.perf_counter() - start)
        if c_step is not None:
            start = time.perf_counter()
            c_step(ids, mask, ids)
            compiled.append(time.perf_counter() - start)
    report = program.report()
    tokens = batch * seq
    row = {"scheme": scheme, "batch": batch, "seq": seq, "compile_s": round(compile_s, 1),
           "trainable": int(sum(int(np.prod(p.shape)) for p in program.layout.params if p.trainable)),
           "pock_tvm_ms": round(1e3 * statistics.median(ours), 1), "torch_ms": round(1e3 * statistics.median(theirs), 1),
           "pock_tvm_memory_mib": round(report.training_bytes() / MIB, 1),
           "torch_memory_mib": round(t_bytes(ids, mask, ids) / MIB, 1)}
    row["pock_tvm_tokens_s"] = round(tokens / (row["pock_tvm_ms"] / 1e3), 1)
    row["torch_tokens_s"] = round(tokens / (row["torch_ms"] / 1e3), 1)
    row["speedup"] = round(row["torch_ms"] / row["pock_tvm_ms"], 2)
    if compiled:
        row["torch_compile_ms"] = round(1e3 * statistics.median(compiled), 1)
        row["torch_compile_s"] = round(inductor_s, 1)
        row["speedup_vs_compile"] = round(row["torch_compile_ms"] / row["pock_tvm_ms"], 2)
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], full_torch_mib: float | None) -> str:
    lines = ["| scheme | batch x seq | trainable | pock_tvm ms (tok/s) | torch ms (tok/s) | torch / pock_tvm | "
             "torch.compile ms | torch.compile / pock_tvm | pock_tvm memory | torch memory | vs torch full | "
             "compile s (pock_tvm / inductor) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['pock_tvm_memory_mib'] / full_torch_mib:.2f}" if full_torch_mib else "-"
        lines.append(f"| {r['scheme']} | {r['batch']}x{r['seq']} | {r['trainable'] / 1e6:.2f} M | {r['pock_tvm_ms']} "
                     f"({r['pock_tvm_tokens_s']}) | {r['torch_ms']} ({r['torch_tokens_s']}) | {r['speedup']}x | "
                     f"{r.get('torch_compile_ms', '-')} | "
                     f"{str(r['speedup_vs_compile']) + 'x' if 'speedup_vs_compile' in r else '-'} | "
                     f"{r['pock_tvm_memory_mib']} MiB | {r['torch_memory_mib']} MiB | {ratio} | "
                     f"{r['compile_s']} / {r.get('torch_compile_s', '-')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--schemes", default="last-2,lora,full")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-peers", action="store_true", help="leave torch.compile out (it compiles ~1 min a scheme)")
    args = parser.parse_args()

    from pock_tvm.models.hf import smollm2
    from pock_tvm.runtime.files import write_json

    model, _ = smollm2()
    rows = [measure(model, s, args.batch, args.seq, args.rounds, peers=not args.no_peers)
            for s in args.schemes.split(",")]
    full = next((r["torch_memory_mib"] for r in rows if r["scheme"] == "full"), None)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_llm_step.py " + " ".join(sys.argv[1:])
    write_json(args.out / "llm_step_host.json", {"machine": platform.machine(), "command": command, "rows": rows})
    from pock_tvm.tuning import host_isa

    text = (f"# SmolLM2-135M training step on the host CPU ({host_isa()}, {os.cpu_count()} cores; Adam; "
            f"{time.strftime('%Y-%m-%d')})\n\n"
            f"`{command}`\n\n"
            + table(rows, full) + "\n\n'vs torch full': pock_tvm's training memory over PyTorch's for full "
            "fine-tuning. Memory counts what a step adds to the weights (see the script's docstring). "
            "torch.compile is inductor on the CPU (default mode), timed in the same rounds; its compile "
            "time is the first call's.\n")
    (args.out / "llm_step_host.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
