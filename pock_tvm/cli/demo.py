"""The main job (``make demo``): adapt a pretrained CNN to a new sensor on the device, choosing what
to update by contribution analysis within a memory budget.

1. :mod:`pock_tvm.tasks.digits`: a :class:`~pock_tvm.models.DigitsCNN` pretrained on clean digits
   (cached), and the same kind of digits through a new sensor: 300 labelled, 600 held out.
2. Budget: ``budget_fraction`` of what the compiler plans for full fine-tuning.
3. :func:`pock_tvm.search.scheme_search.search_scheme` picks the updates (cached per model + data).
4. No update, bias-only, the searched scheme and full fine-tuning are compiled, fine-tuned on the
   labelled samples and tested on the held-out ones; each bundle's training memory is measured
   by the C++ runner (``pock_runner train``), not estimated.
5. The searched scheme's bundle for ``rpi4`` trains under qemu and must give the host's losses.

Writes ``summary.json`` and ``schemes.png`` to ``out``; the last line printed is the summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path


from ..runtime.report import format_bytes
from ..optim import Adam, SGD
from ..runtime.files import write_json
from ..search import AnalysisSettings

logger = logging.getLogger(__name__)
BOARD = "rpi4"


@dataclass(frozen=True)
class DemoSettings:
    batch: int = 16
    epochs: int = 30  # of the final fine-tunes over the 300 labelled samples
    optimizer: SGD | Adam = field(default_factory=lambda: Adam(lr=1e-3))
    analysis_epochs: int = 6
    budget_fraction: float = 0.25  # of full fine-tuning's planned training memory
    seed: int = 0
    board_steps: int = 3  # steps of the searched scheme on the emulated board
    runner_steps: int = 5  # steps each bundle trains in the runner to measure its memory


def demo(out: str | Path = "out/demo", settings: DemoSettings = DemoSettings(), board: bool = True) -> dict:
    import torch

    from ..frontend import import_model
    from ..cache import cache_dir
    from ..tasks.digits import LABELLED, load_task, pretrained
    from ..compiler.step import build_many, plan_step
    from ..search.scheme_search import progress_bar, search_scheme

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # the runners build (cmake, other processes) while this one plans on one core
    qemu = shutil.which("qemu-aarch64-static") if board else None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pock_tvm-runner") as runner_builds:
        host_runner = runner_builds.submit(_build_runner, "host")
        board_runner = runner_builds.submit(_build_runner, BOARD) if qemu else None
        task = load_task()
        model = pretrained(cache_dir() / "demo")
        imported = import_model(model, (torch.zeros(settings.batch, *task.test[0].shape[1:]),))

        def plan(scheme, target="host"):
            return plan_step(imported, scheme=scheme, optimizer=settings.optimizer, target=target, baseline=False)

        full = plan("full")
        budget = int(settings.budget_fraction * full.report.training_bytes())
        print(f"task: {LABELLED} labelled digits through a new sensor ({_sensor_text(task.sensor)}), "
              f"{len(task.test[1])} held out")
        print(f"budget: {settings.budget_fraction:g} of full fine-tuning's planned training memory "
              f"({format_bytes(full.report.training_bytes())}) = {format_bytes(budget)}\n")
        analysis_settings = AnalysisSettings(epochs=settings.analysis_epochs, optimizer=settings.optimizer,
                                             seed=settings.seed)
        found = search_scheme(imported, *task.labelled, batch=settings.batch, budget=budget, seed=settings.seed,
                              settings=analysis_settings, cache_dir=cache_dir() / "search", progress=progress_bar())
        print(found.table() + "\n")
        search_s = time.perf_counter() - start

        # the schemes compared (and the searched one for the board) are planned, then built together
        plans = {"bias-only": plan("bias-only"), "searched": plan(found.scheme), "full": full}
        if qemu:
            plans[f"searched-{BOARD}"] = plan(found.scheme, BOARD)
        programs = dict(zip(plans, build_many(list(plans.values()))))
        runner = host_runner.result()
        rows = {"no update": None}
        for name in ("bias-only", "searched", "full"):
            rows[name] = _fine_tune(programs[name], task, settings, out / "bundles" / name, runner)
            if rows["no update"] is None:
                rows["no update"] = {"test_accuracy": rows[name].pop("accuracy_before"), "measured_training_kib": 0,
                                     "planned_training_bytes": 0, "median_step_ms": None}
            rows[name].pop("accuracy_before", None)
        print(_table(rows))
        if not board:
            on_board = {"skipped": "board run switched off (--no-board)"}
        else:
            on_board = _on_board(programs.get(f"searched-{BOARD}"), board_runner and board_runner.result(),
                                 found.scheme, imported, task, settings, out, runner)

    summary = {
        "task": {"data": "sklearn load_digits, 8x8 upsampled to 24x24, standardized per image",
                 "sensor": asdict(task.sensor), "labelled": int(len(task.labelled[1])),
                 "test": int(len(task.test[1])), "model": "DigitsCNN (pretrained on the source domain)"},
        "settings": {**asdict(settings), "optimizer": asdict(settings.optimizer)},
        "budget_bytes": budget, "full_planned_bytes": full.report.training_bytes(),
        "schemes": rows,
        "searched": {"options": [o.key for o in found.choice.options], "method": found.choice.method,
                     "planned_bytes": found.planned_bytes, "scheme": found.scheme.to_dict()},
        "board": on_board,
        "seconds": {"search": round(search_s, 1), "total": round(time.perf_counter() - start, 1)},
    }
    _plot(found, rows, budget, out / "schemes.png")
    write_json(out / "summary.json", summary)
    print(f"\nwrote {out / 'summary.json'} and {out / 'schemes.png'}")
    print(json.dumps(summary, separators=(",", ":")))
    return summary


def _sensor_text(sensor) -> str:
    return (f"rotated {sensor.rotation_deg:g} deg, {sensor.blur} blur, contrast x{sensor.contrast:g}, "
            f"{'inverted, ' if sensor.inverted else ''}noise sigma {sensor.noise_sigma:g}")


def _fine_tune(program, task, settings: DemoSettings, bundle: Path, runner: Path | None) -> dict:
    from ..training.finetune import accuracy, fit

    if runner is not None:
        _save(program, bundle)  # before training: the device starts from the pretrained weights
    before = accuracy(program, *task.test)
    result = fit(program, *task.labelled, settings.epochs, settings.seed)
    row = {"test_accuracy": accuracy(program, *task.test), "accuracy_before": before,
           "planned_training_bytes": program.report_data.training_bytes(),
           "median_step_ms": round(result.median_step_ms, 2), "first_loss": result.losses[0],
           "last_loss": result.losses[-1]}
    print(f"{program.layout.scheme['name']}: test accuracy {100 * before:.1f}% -> {100 * row['test_accuracy']:.1f}% "
          f"after {settings.epochs} epochs, {row['median_step_ms']:.1f} ms/step")
    row["measured_training_kib"] = None if runner is None else _runner_memory(program, task, settings, bundle, runner)
    return row


def _runner_memory(program, task, settings: DemoSettings, bundle: Path, runner: Path) -> int:
    """Peak memory the runner's training steps on ``bundle`` add to the loaded bundle, plus its
    optimizer state."""
    from ..runtime.bundle import write_batches

    data = bundle.parent / f"{bundle.name}.data.bin"
    write_batches(data, program.layout, [task.labelled[0]], task.labelled[1])
    result = subprocess.run([str(runner / "pock_runner"), "train", str(bundle), str(data), "--steps",
                             str(settings.runner_steps), "--no-save"], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise ValueError(f"demo: the runner failed on {bundle}: {result.stderr.strip()[-600:]}")
    fields = next(line.split() for line in result.stdout.splitlines() if line.startswith("memory "))
    values = dict(zip(fields[1::2], (int(v) for v in fields[2::2])))
    return values["train_peak_kib"] + values["optimizer_state_kib"]


def _save(program, bundle: Path) -> None:
    """Save a fresh bundle; TVM's per-constant warnings while exporting go to ``tvm.log`` beside it."""
    if bundle.exists():
        shutil.rmtree(bundle)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    with open(bundle.parent / "tvm.log", "ab") as log, _native_stderr(log):
        program.save(bundle)


@contextlib.contextmanager
def _native_stderr(file):
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _build_runner(target: str) -> Path | None:
    from ..targets.runner_build import build_runner

    try:
        return build_runner(target)
    except ValueError as err:  # no cmake / cross compiler: say so, keep the rest of the demo
        logger.warning("demo: cannot build the %s runner (%s)", target, err)
        return None


def _on_board(board_program, runner, scheme, imported, task, settings: DemoSettings, out: Path, host_runner) -> dict:
    """The searched scheme's rpi4 bundle under qemu: its losses against the host's, step by step."""
    from ..compiler.step import compile
    from ..runtime.bundle import write_batches
    from ..runtime.program import load_program

    if board_program is None or runner is None:
        reason = "qemu-aarch64-static is missing" if board_program is None else f"the {BOARD} runner could not be built"
        print(f"\nemulated {BOARD}: skipped ({reason}; `make tools` installs the cross tools as root)")
        return {"skipped": reason}
    n = settings.board_steps * settings.batch
    x, y = task.labelled[0][:n], task.labelled[1][:n]
    # the host side: the searched scheme's bundle as saved before its fine-tune (pretrained weights),
    # or compiled again when the host runner (which needs the bundle) could not be built
    saved = out / "bundles" / "searched"
    host = load_program(saved) if host_runner is not None and saved.is_dir() else \
        compile(imported, scheme=scheme, optimizer=settings.optimizer, baseline=False)
    host_losses = [host.step(x[i:i + settings.batch], y[i:i + settings.batch]) for i in range(0, n, settings.batch)]
    bundle = out / "bundles" / f"searched-{BOARD}"
    _save(board_program, bundle)
    data = out / "bundles" / f"searched-{BOARD}.data.bin"
    write_batches(data, host.layout, [x], y)
    start = time.perf_counter()
    result = subprocess.run(["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu", str(runner / "pock_runner"),
                             "train", str(bundle), str(data), "--no-save"], capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0:
        raise ValueError(f"demo: the {BOARD} runner failed under qemu: {result.stderr.strip()[-600:]}")
    board_losses = [float(line.split()[3]) for line in result.stdout.splitlines() if line.startswith("step ")]
    diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(board_losses, host_losses))
    print(f"\nemulated {BOARD} (qemu, {time.perf_counter() - start:.1f} s): losses "
          + " ".join(f"{v:.5f}" for v in board_losses) + "; host " + " ".join(f"{v:.5f}" for v in host_losses)
          + f" (largest relative difference {diff:.1e})")
    return {"target": BOARD, "losses": board_losses, "host_losses": host_losses, "max_relative_difference": diff}


def _table(rows: dict) -> str:
    lines = ["", f"{'scheme':<12} {'test accuracy':>14} {'training memory (runner)':>25} {'planned':>11} "
                 f"{'step (host)':>12}"]
    for name, r in rows.items():
        measured = "-" if not r["measured_training_kib"] else format_bytes(1024 * r["measured_training_kib"])
        planned = "-" if not r["planned_training_bytes"] else format_bytes(r["planned_training_bytes"])
        step = "-" if r["median_step_ms"] is None else f"{r['median_step_ms']:.1f} ms"
        lines.append(f"{name:<12} {100 * r['test_accuracy']:>13.1f}% {measured:>25} {planned:>11} {step:>12}")
    return "\n".join(lines)


def _plot(found, rows: dict, budget: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runtime.files import atomic_file

    base = found.analysis.baseline_accuracy or 0.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    measured = [r for r in found.analysis.rows if r.accuracy is not None]
    ax.scatter([r.memory / 2**20 for r in measured], [100 * r.accuracy for r in measured], s=14, c="0.6",
               label="one option alone (short fine-tune, validation)")
    colors = {"bias-only": "tab:blue", "searched": "tab:red", "full": "tab:green"}
    for name, color in colors.items():
        r = rows[name]
        ax.scatter([r["planned_training_bytes"] / 2**20], [100 * r["test_accuracy"]], s=160 if name == "searched" else 60,
                   marker="*" if name == "searched" else "o", c=color, zorder=3,
                   label=f"{name} ({'chosen, ' if name == 'searched' else ''}full fine-tune, test)")
    ax.axhline(100 * rows["no update"]["test_accuracy"], ls=":", c="0.3", label="no update (test)")
    ax.axvline(budget / 2**20, ls="--", c="tab:red", lw=1, label="budget")
    ax.set_xlabel("planned training memory (MiB)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Schemes considered (validation accuracy before any update: {100 * base:.0f}%)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
