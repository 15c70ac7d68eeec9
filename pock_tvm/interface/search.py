"""``pock-tvm search``: contribution analysis + budgeted search, checked by the compiler, as a scheme file."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..analysis.report import format_bytes
from ..scheme import Scheme
from ..search import Analysis, AnalysisSettings, Choice, analyze, scheme_of, search
from ..search.search import check_budget, items

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_TIME_UNITS = {"ms": 1.0, "s": 1e3, "us": 1e-3}
FILL_TRIES = 6  # plans tried to add options the additive estimate left out
RETRIES = 4  # how often a compiler check that exceeds the budget tightens it and searches again


def parse_size(text: str) -> int:
    """``"2MB"``, ``"512KiB"``, ``"1.5 GB"`` or plain bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"search: budget {text!r} is not a size; write e.g. 2MB, 512KiB or 1500000")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_ms(text: str) -> float:
    """``"30ms"``, ``"0.5s"`` -> milliseconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|us)\s*", str(text))
    if not match:
        raise ValueError(f"search: latency {text!r} is not a time; write e.g. 30ms or 0.5s")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


@dataclass
class SearchResult:
    analysis: Analysis
    choice: Choice
    scheme: Scheme
    planned_bytes: int  # what the compiler plans for the chosen scheme
    budget: int
    tries: int

    def table(self) -> str:
        base = self.analysis.baseline_accuracy or 0.0
        lines = [f"{'update':<52} {'gain (val)':>11} {'planned alone':>14} {'step alone':>11}"]
        for option in self.choice.options:
            row = self.analysis.row(option.key)
            lines.append(f"{option.describe():<52} {100 * row.gain(base):>+10.1f}p {format_bytes(row.memory):>14} "
                         f"{row.step_ms:>9.1f}ms")
        lines += ["", f"validation accuracy before any update: {100 * base:.1f}%; estimated gain "
                      f"{100 * self.choice.gain:+.1f} points ({self.choice.method} search)",
                  f"planned training memory: {format_bytes(self.planned_bytes)} (the compiler's plan of the whole "
                  f"scheme; budget {format_bytes(self.budget)})"]
        if self.choice.latency_ms is not None:
            lines.append(f"estimated step time: {self.choice.latency_ms:.1f} ms")
        return "\n".join(lines)


def progress_bar(stream=sys.stderr):
    """A ``progress(done, total, text)`` callback drawing one line on ``stream``."""
    def show(done: int, total: int, text: str) -> None:
        filled = int(30 * done / max(total, 1))
        end = "\n" if done >= total else ""
        stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {text[:60]:<60}{end}")
        stream.flush()
    return show


def search_scheme(imported, x: np.ndarray, y: np.ndarray, *, batch: int, budget: int,
                  latency_ms: float | None = None, seed: int = 0,
                  settings: AnalysisSettings = AnalysisSettings(), cache_dir=None, progress=None,
                  target: str = "host") -> SearchResult:
    """Analyze (cached), search, and check the choice with the compiler's plan of the whole scheme;
    when the plan exceeds the budget, search again with the budget tightened by the excess."""
    from .compiler import plan_step

    analysis = analyze(imported, x, y, batch=batch, settings=settings, budget=budget, cache_dir=cache_dir,
                       progress=progress, target=target)
    check_budget(analysis, budget, latency_ms)
    if not items(analysis, latency_ms is not None):
        raise ValueError("search: no update option improved the validation accuracy in its short fine-tune; "
                         "the model may already fit this data, or give more labelled samples / epochs")
    def planned(options) -> int:
        return plan_step(imported, scheme=scheme_of(options), loss=settings.loss, optimizer=settings.optimizer,
                         target=target, baseline=False).report.training_bytes()

    limit = budget
    for tries in range(1, RETRIES + 1):
        choice = search(analysis, limit, latency_ms, seed)
        memory = planned(choice.options)
        if memory <= budget:
            break
        limit -= memory - budget
    else:
        raise ValueError(f"search: the compiler plans more than {format_bytes(budget)} for every choice tried "
                         f"({RETRIES} tries); raise the budget")
    choice, memory = _fill(analysis, choice, memory, budget, latency_ms, planned)
    return SearchResult(analysis, choice, scheme_of(choice.options), memory, budget, tries)


def _fill(analysis: Analysis, choice: Choice, memory: int, budget: int, latency_ms, planned):
    """Add options the additive estimate left out while the compiler's plan of the whole scheme stays
    within the budget: options sharing a backward path cost less together than their sum. Tries the
    groups not yet chosen, best gain first (at most ``FILL_TRIES`` plans); skipped with a latency
    budget (a step time is only known by running it)."""
    if latency_ms is not None:
        return choice, memory
    taken = {o.group for o in choice.options}
    candidates = sorted((i for group in items(analysis, False).values() for i in group
                         if i.option.group not in taken), key=lambda i: (-i.gain, i.option.key))
    tried = 0
    for item in candidates:
        if item.option.group in taken or tried >= FILL_TRIES:
            continue
        tried += 1
        options = (*choice.options, item.option)
        total = planned(options)
        if total <= budget:
            taken.add(item.option.group)
            choice = replace(choice, options=options, gain=choice.gain + item.gain, memory=choice.memory + item.memory,
                             method=choice.method + "+fill")
            memory = total
    return choice, memory


def search_command(model: str, data: str, budget: str, output: str, latency: str | None = None,
                   input_shape=None, seed: int = 0, epochs: int | None = None, cache_dir: str | None = None,
                   target: str = "host") -> SearchResult:
    """``pock-tvm search MODEL --data D.npz --budget 2MB [--latency 30ms] -o scheme.toml``."""
    from ..frontend import import_model
    from ..runtime.files import atomic_file, writable_file
    from ..targets.runner_build import cache_dir as default_cache
    from .commands import load_model

    size, ms = parse_size(budget), parse_ms(latency) if latency is not None else None
    writable_file(output, "search -o")  # before minutes of analysis, not after
    model_obj, example = load_model(model, input_shape)
    if example is None:
        raise ValueError("search: ONNX models are not supported by search yet; give a torch model")
    if not Path(data).exists():
        raise ValueError(f"search: no such data file '{data}'")
    with np.load(data) as arrays:
        if "x" not in arrays.files or "y" not in arrays.files:
            raise ValueError(f"search: data file '{data}' needs arrays 'x' (inputs) and 'y' (labels); it has "
                             f"{sorted(arrays.files)}")
        x, y = arrays["x"].astype("float32"), arrays["y"].astype("int64")
    if tuple(x.shape[1:]) != tuple(example[0].shape[1:]):
        raise ValueError(f"search: data samples have shape {tuple(x.shape[1:])}, the model takes "
                         f"{tuple(example[0].shape[1:])}; give --input-shape or reshape the data")
    settings = AnalysisSettings(seed=seed) if epochs is None else AnalysisSettings(epochs=epochs, seed=seed)
    result = search_scheme(import_model(model_obj, example), x, y, batch=int(example[0].shape[0]), budget=size,
                           latency_ms=ms, seed=seed, settings=settings, progress=progress_bar(),
                           cache_dir=cache_dir or default_cache() / "search", target=target)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        f.write(result.scheme.to_toml().encode())
    return result
