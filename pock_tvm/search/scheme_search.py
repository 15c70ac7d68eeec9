"""The scheme search as one call: contribution analysis + budgeted search, checked by the compiler's plan."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..runtime.files import write_json
from ..runtime.report import format_bytes
from ..scheme import Scheme
from .contribution import Analysis, AnalysisSettings, analyze
from .search import Choice, check_budget, items, search
from .space import scheme_of
from .step_check import StepCheck, check_step, step_args

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_TIME_UNITS = {"ms": 1.0, "s": 1e3, "us": 1e-3, "min": 6e4}
FILL_TRIES = 6  # plans tried to add options the additive estimate left out
RETRIES = 4  # how often a compiler check that exceeds the budget tightens it and searches again
CHOICE_VERSION = 2  # of the cached choice files


def parse_size(text: str) -> int:
    """``"2MB"``, ``"512KiB"``, ``"1.5 GB"`` or plain bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"search: budget {text!r} is not a size; write e.g. 2MB, 512KiB or 1500000")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_ms(text: str, what: str = "latency") -> float:
    """``"30ms"``, ``"0.5s"``, ``"20min"`` -> milliseconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|us|min)\s*", str(text))
    if not match:
        raise ValueError(f"search: {what} {text!r} is not a time; write e.g. 30ms, 0.5s or 20min")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


@dataclass
class SearchResult:
    analysis: Analysis
    choice: Choice
    scheme: Scheme
    planned_bytes: int  # what the compiler plans for the chosen scheme
    budget: int
    tries: int
    step: StepCheck | None = None  # the chosen scheme's step, timed (with a latency budget)
    reference: str | None = None  # the scheme whose step it had to match (``latency_of``)

    def table(self) -> str:
        base = self.analysis.baseline_accuracy or 0.0
        nats = self.analysis.settings.scored_by_loss
        per = "/token" if self.analysis.settings.loss == "next_token" else ""
        lines = [f"{'update':<52} {'gain (val)':>11} {'planned alone':>14} {'step alone':>11}"]
        for option in self.choice.options:
            row = self.analysis.row(option.key)
            gain = f"{row.gain(base):>+9.4f}n" if nats else f"{100 * row.gain(base):>+10.1f}p"
            lines.append(f"{option.describe():<52} {gain} {format_bytes(row.memory):>14} "
                         f"{'~' if row.step_estimated else ' '}{row.step_ms:>8.1f}ms")
        before = (f"validation loss before any update: {-base:.4f} nats{per}"
                  + (f" (perplexity {np.exp(-base):.2f})" if per else "")
                  + f"; estimated gain {self.choice.gain:+.4f} nats{per}" if nats else
                  f"validation accuracy before any update: {100 * base:.1f}%; estimated gain "
                  f"{100 * self.choice.gain:+.1f} points")
        lines += ["", f"{before} ({self.choice.method} search)",
                  f"planned training memory: {format_bytes(self.planned_bytes)} (the compiler's plan of the whole "
                  f"scheme; budget {format_bytes(self.budget)})"]
        if self.choice.latency_ms is not None:
            lines.append(f"estimated step time: {self.choice.latency_ms:.1f} ms")
        if self.step is not None:
            lines.append(self.step.describe(self.reference and f"'{self.reference}'"))
        lines.append(f"analysis: {self.analysis.seconds:.0f} s (cached for the next search)")
        unmeasured = self.analysis.unmeasured()
        if unmeasured:
            lines.append(f"not fine-tuned (over the budget alone, dominated, or past the time budget): "
                         f"{len(unmeasured)} options")
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
                  target: str = "host", upload_bytes: int | None = None, latency_of=None) -> SearchResult:
    """Analyze (cached), search, and check the choice with the compiler's plan of the whole scheme;
    ``upload_bytes``: at most this many bytes of trained tensors (what a federated node sends
    each round, :func:`trained_bytes`);
    when the plan exceeds the budget, search again with the budget tightened by the excess.

    A step-time budget is ``latency_ms`` (milliseconds on this machine) or ``latency_of`` (a scheme,
    preset name or scheme file: no slower than that scheme's step). The analysis's step times are
    estimates, so the chosen scheme is then compiled and timed (:mod:`.step_check`): alone against
    ``latency_ms``, or alternating with the compiled reference; while it is slower, the search runs
    again with the step budget tightened by the excess (at most :data:`RETRIES` times, then an
    error). With ``cache_dir`` the checked choice is cached too (per analysis, budget, latency,
    seed and target), so a second search plans and times nothing."""
    from ..compiler.step import plan_step

    if latency_ms is not None and latency_of is not None:
        raise ValueError("search: give a step time (latency_ms) or a scheme to be no slower than (latency_of), "
                         "not both")
    reference = Scheme.load(latency_of) if latency_of is not None else None
    analysis = analyze(imported, x, y, batch=batch, settings=settings, budget=budget, cache_dir=cache_dir,
                       progress=progress, target=target)

    def compiled(scheme):
        from ..compiler.step import build

        return build(plan_step(imported, scheme=scheme, loss=settings.loss, optimizer=settings.optimizer,
                               target=target, baseline=False))

    reference_name = reference.name if reference is not None else None
    reference_program = functools.cache(lambda: compiled(reference)) if reference is not None else None
    if reference is not None:  # the budget the search estimates with: the reference's step in the analysis
        row = _row_like(analysis, imported, reference)
        latency_ms = row.step_ms if row is not None and row.step_ms is not None else \
            check_step(reference_program(), step_args(x, y, batch)).step_ms
    check_budget(analysis, budget, latency_ms)
    path = _choice_path(cache_dir, analysis, budget, latency_ms, seed, target, upload_bytes,
                        reference.to_toml() if reference is not None else None)
    uploads = {row.option.key: trained_bytes(imported, [row.option]) for row in analysis.rows} \
        if upload_bytes is not None else None
    cached = _load_choice(path, analysis)
    if cached is not None:
        return SearchResult(analysis, cached[0], scheme_of(cached[0].options), cached[1], budget, cached[2],
                            cached[3], reference_name)
    if not items(analysis, latency_ms is not None):
        raise ValueError("search: no update option improved the validation score in its short fine-tune; "
                         "the model may already fit this data, or give more labelled samples / epochs (with "
                         "few validation samples, score by held-out loss: AnalysisSettings(metric='loss'))")
    def planned(options) -> int:
        return plan_step(imported, scheme=scheme_of(options), loss=settings.loss, optimizer=settings.optimizer,
                         target=target, baseline=False).report.training_bytes()

    limit = budget
    for tries in range(1, RETRIES + 1):
        choice = search(analysis, limit, latency_ms, seed, upload_bytes=upload_bytes, uploads=uploads)
        memory = planned(choice.options)
        if memory <= budget:
            break
        limit -= memory - budget
    else:
        choice, memory = _shrink(analysis, choice, budget, planned)
    choice, memory = _fill(analysis, choice, memory, budget, latency_ms, planned,
                           None if upload_bytes is None else lambda options: trained_bytes(imported, options) <= upload_bytes)
    step = None
    if latency_ms is not None:
        def research(step_limit):
            return search(analysis, limit, step_limit, seed, upload_bytes=upload_bytes, uploads=uploads)

        choice, memory, step = _check_steps(choice, memory, budget, latency_ms, research, planned,
                                            lambda options: compiled(scheme_of(options)), reference_program,
                                            step_args(x, y, batch), reference_name)
    if path is not None:
        write_json(path, {"version": CHOICE_VERSION, "options": [o.key for o in choice.options], "gain": choice.gain,
                          "memory": choice.memory, "latency_ms": choice.latency_ms, "method": choice.method,
                          "planned_bytes": memory, "tries": tries, "step": step and step.to_json()})
    return SearchResult(analysis, choice, scheme_of(choice.options), memory, budget, tries, step, reference_name)


def _check_steps(choice: Choice, memory: int, budget: int, latency_ms: float, research, planned, compiled,
                 reference, args: tuple, reference_name: str | None):
    """Compile and time the chosen scheme's step (alternating with the program ``reference()``
    returns, when given); while it is slower than ``latency_ms`` (or the reference), search again
    (``research(step budget)``) with the step budget tightened by the excess. ``(choice, planned
    bytes, StepCheck)``."""
    limit, reference = latency_ms, reference() if reference is not None else None
    for _ in range(RETRIES):
        program = compiled(choice.options)
        step = check_step(program, args, reference)
        del program
        excess = step.excess_ms(latency_ms)
        if excess <= 0:
            return choice, memory, step
        limit -= excess
        try:
            choice = research(limit)
        except ValueError:
            break  # nothing fits the tightened budget
        memory = planned(choice.options)
        if memory > budget:
            break
    against = f"the step of '{reference_name}'" if reference_name else f"{latency_ms:.1f} ms"
    raise ValueError(f"search: the chosen schemes' compiled steps stay slower than {against} (last: "
                     f"{step.describe(reference_name)}; the analysis's step estimates miss on this model); raise "
                     "the step-time budget, or search without one and compare the steps")


def _row_like(analysis: Analysis, imported, scheme: Scheme):
    """The analysis's row of the option that trains what ``scheme`` trains (e.g. the ``lora``
    preset is the option ``lora:attention:r8``), or None."""
    wanted = (scheme.resolve(imported), scheme.lora)
    for row in analysis.rows:
        option = scheme_of([row.option])
        if (option.resolve(imported), option.lora) == wanted:
            return row
    return None


def trained_bytes(imported, options) -> int:
    """Bytes of the tensors the scheme of ``options`` trains (a partial weight: its trained
    channels): what a federated node sends back each round."""
    updates = scheme_of(options).resolve(imported)
    total = 0
    for p in imported.params:
        update = updates.get(p.name)
        if update is None or update.mode == "frozen":
            continue
        value = np.asarray(p.value)
        share = update.channels / value.shape[update.axis] if update.mode == "partial" and update.channels else 1.0
        total += int(round(value.nbytes * share))
    return total


def _choice_path(cache_dir, analysis: Analysis, budget: int, latency_ms, seed: int, target,
                 upload_bytes: int | None = None, reference: str | None = None) -> Path | None:
    if cache_dir is None:
        return None
    from .. import __version__

    what = json.dumps([CHOICE_VERSION, __version__, analysis.key, budget, latency_ms, seed, str(target), FILL_TRIES,
                       RETRIES, *([upload_bytes] if upload_bytes is not None else []),
                       *([reference] if reference is not None else [])])
    return Path(cache_dir) / f"choice-{hashlib.sha256(what.encode()).hexdigest()[:20]}.json"


def _load_choice(path: Path | None, analysis: Analysis) -> tuple[Choice, int, int, StepCheck | None] | None:
    """``(choice, planned bytes, tries, step check)`` from the cache; None when absent or unreadable
    (searched again)."""
    if path is None or not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        rows = [analysis.row(key) for key in data["options"]]
        if data.get("version") != CHOICE_VERSION or any(r is None for r in rows):
            return None
        choice = Choice(tuple(r.option for r in rows), float(data["gain"]), int(data["memory"]), data["latency_ms"],
                        str(data["method"]))
        step = StepCheck.from_json(data["step"]) if data.get("step") else None
        return choice, int(data["planned_bytes"]), int(data["tries"]), step
    except (ValueError, KeyError, TypeError):
        return None


def _shrink(analysis: Analysis, choice: Choice, budget: int, planned) -> tuple[Choice, int]:
    """After :data:`RETRIES` tightened searches still plan over the budget (the estimate keeps
    missing what options cost together): drop the chosen option with the least gain per byte of
    its own planned memory until the compiler's plan fits."""
    base = analysis.baseline_accuracy or 0.0
    options = list(choice.options)
    while len(options) > 1:
        worst = min(options, key=lambda o: (analysis.row(o.key).gain(base) / max(analysis.row(o.key).memory, 1), o.key))
        options.remove(worst)
        memory = planned(options)
        if memory <= budget:
            gain = sum(analysis.row(o.key).gain(base) for o in options)
            return replace(choice, options=tuple(options), gain=gain, method=choice.method + "+shrunk"), memory
    raise ValueError(f"search: the compiler plans more than {format_bytes(budget)} for every choice tried "
                     f"({RETRIES} searches, then dropping options one by one); raise the budget")


def _fill(analysis: Analysis, choice: Choice, memory: int, budget: int, latency_ms, planned, fits=None):
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
        if fits is not None and not fits(options):
            continue
        total = planned(options)
        if total <= budget:
            taken.add(item.option.group)
            choice = replace(choice, options=options, gain=choice.gain + item.gain, memory=choice.memory + item.memory,
                             method=choice.method + "+fill")
            memory = total
    return choice, memory
