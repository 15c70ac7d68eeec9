"""Contribution analysis: what each update option buys on the user's data, and what it costs.

For every :class:`~.space.Option` the compiler plans the step that applies it alone
(:func:`pock_tvm.compiler.step.plan_step`): its planned training memory
(:meth:`Report.training_bytes`) and backward FLOPs. Options that fit the budget alone are then
compiled and fine-tuned from the model's weights for a few epochs on a training split of the data;
the gain is the accuracy on the held-out validation split minus the model's accuracy before any
update. Results are cached per model + data + settings (a JSON file, written after every option),
so a second search is instant and an interrupted one continues.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..frontend import import_model
from ..optim import Adam, SGD, optimizer_from_json
from ..runtime.files import write_json
from .space import Option, options_for, scheme_of

logger = logging.getLogger(__name__)
CACHE_VERSION = 1
# the plans of one run are kept for the fine-tunes (each option is planned once, not twice) while
# their folded frozen weights stay under this many bytes; beyond it an option is planned again
KEEP_PLANNED_BYTES = 256 << 20


@dataclass(frozen=True)
class AnalysisSettings:
    """How each option is fine-tuned. The defaults suit a few hundred labelled samples."""

    epochs: int = 6
    optimizer: SGD | Adam = field(default_factory=lambda: Adam(lr=1e-3))
    loss: str = "cross_entropy"
    val_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"search: val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.epochs < 1:
            raise ValueError(f"search: epochs must be at least 1, got {self.epochs}")

    def to_json(self) -> dict:
        return {**asdict(self), "optimizer": asdict(self.optimizer)}

    @staticmethod
    def from_json(data: dict) -> AnalysisSettings:
        return AnalysisSettings(**{**data, "optimizer": optimizer_from_json(data["optimizer"])})


@dataclass
class OptionRow:
    option: Option
    memory: int  # planned training bytes of the step applying this option alone
    backward_flops: int
    accuracy: float | None = None  # validation accuracy after the short fine-tune
    step_ms: float | None = None  # median step time of that fine-tune on this machine

    def gain(self, baseline: float) -> float | None:
        return None if self.accuracy is None else self.accuracy - baseline

    def to_json(self) -> dict:
        return {**asdict(self), "option": asdict(self.option)}

    @staticmethod
    def from_json(data: dict) -> OptionRow:
        return OptionRow(**{**data, "option": Option(**data["option"])})


@dataclass
class Analysis:
    key: str
    settings: AnalysisSettings
    inference_bytes: int  # planned memory of the forward alone: the cost of no update
    rows: list[OptionRow]
    baseline_accuracy: float | None = None  # validation accuracy before any update
    forward_ms: float | None = None  # median time of one batch's forward on this machine

    def row(self, key: str) -> OptionRow | None:
        return next((r for r in self.rows if r.option.key == key), None)

    def to_json(self) -> dict:
        return {"version": CACHE_VERSION, "key": self.key, "settings": self.settings.to_json(),
                "inference_bytes": self.inference_bytes, "baseline_accuracy": self.baseline_accuracy,
                "forward_ms": self.forward_ms, "rows": [r.to_json() for r in self.rows]}

    @staticmethod
    def from_json(data: dict) -> Analysis:
        return Analysis(data["key"], AnalysisSettings.from_json(data["settings"]), data["inference_bytes"],
                        [OptionRow.from_json(r) for r in data["rows"]], data.get("baseline_accuracy"),
                        data.get("forward_ms"))


def split(x: np.ndarray, y: np.ndarray, settings: AnalysisSettings):
    """``(train_x, train_y, val_x, val_y)``: a seeded split, ``val_fraction`` of the samples held out."""
    order = np.random.default_rng(settings.seed).permutation(len(y))
    n_val = max(1, int(round(settings.val_fraction * len(y))))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def analysis_key(imported, x: np.ndarray, y: np.ndarray, settings: AnalysisSettings) -> str:
    """Hash of the model (its graph and weights), the data and the settings."""
    h = hashlib.sha256()
    h.update(imported.mod["forward"].script().encode())
    for p in imported.params:
        h.update(p.name.encode())
        h.update(np.ascontiguousarray(p.value).tobytes())
    for a in (x, y):
        h.update(str((a.shape, a.dtype)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps(settings.to_json(), sort_keys=True).encode())
    return h.hexdigest()[:20]


def analyze(model, x: np.ndarray, y: np.ndarray, *, batch: int, settings: AnalysisSettings = AnalysisSettings(),
            budget: int | None = None, cache_dir: str | Path | None = None, progress=None,
            target: str = "host") -> Analysis:
    """Costs of every option of ``model`` (a torch module, an ONNX path or an ``ImportedModel``) and
    gains of those whose own planned memory is within ``budget`` bytes (all when ``None``),
    fine-tuned on ``(x, y)`` at ``batch`` samples per step. ``progress(done, total, text)`` is
    called after each measurement. With ``cache_dir`` the results are cached there."""
    import torch

    from ..compiler.step import build_many, plan_step
    from ..training.finetune import accuracy, fit, predict

    x = np.ascontiguousarray(x, dtype="float32")
    y = np.asarray(y)
    train_x, train_y, val_x, val_y = split(x, y, settings)
    if len(train_x) < batch:
        raise ValueError(f"search: the training split has {len(train_x)} samples, fewer than one batch of "
                         f"{batch}; give more data or a smaller batch")
    example = (torch.zeros((batch, *x.shape[1:])),)
    imported = import_model(model, example)
    key = analysis_key(imported, x, y, settings)
    path = Path(cache_dir) / f"contributions-{key}.json" if cache_dir is not None else None
    analysis = _load(path, key)
    options = options_for(imported)

    def plan(scheme):
        return plan_step(imported, scheme=scheme, loss=settings.loss, optimizer=settings.optimizer,
                         target=target, baseline=False)

    todo_cost = [o for o in options if analysis is None or analysis.row(o.key) is None]
    total = len(todo_cost) + len(options)
    done = 0
    kept, kept_bytes = {}, 0  # option -> its plan, for its fine-tune
    for option in todo_cost:
        planned = plan(scheme_of([option], option.key))
        report = planned.report
        if analysis is None:
            analysis = Analysis(key, settings, report.inference_bytes(), [])
        analysis.rows.append(OptionRow(option, report.training_bytes(), int(report.sparse["backward_flops"])))
        _save(path, analysis)
        folded = int(report.planned.get("folded_bytes", 0))
        if (budget is None or report.training_bytes() <= budget) and kept_bytes + folded <= KEEP_PLANNED_BYTES:
            kept[option.key], kept_bytes = planned, kept_bytes + folded
        done += 1
        if progress:
            progress(done, total, f"planned {option.key}: {report.training_bytes() / 2**20:.2f} MiB")
    order = {o.key: i for i, o in enumerate(options)}
    analysis.rows.sort(key=lambda r: order.get(r.option.key, len(order)))

    todo = []
    for row in analysis.rows:
        skip = ("cached" if row.accuracy is not None else
                "alone over the budget, not fine-tuned" if budget is not None and row.memory > budget else
                "a larger ratio plans no more memory, not fine-tuned" if _dominated(row, analysis.rows) else None)
        if not skip:
            todo.append(row)
            continue
        done += 1
        if progress:
            progress(done, total, f"{row.option.key}: {skip}")
    # the options' steps are built together (build_many: code generation overlaps), then fine-tuned
    # one by one, so that no build runs while a step is timed
    for chunk in _planned_chunks(todo, kept, lambda row: plan(scheme_of([row.option], row.option.key))):
        programs = build_many([planned for _, planned in chunk])
        for (row, _), program in zip(chunk, programs):
            done += 1
            if analysis.baseline_accuracy is None:
                analysis.baseline_accuracy = accuracy(program, val_x, val_y)
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    predict(program, val_x[:batch])
                    times.append(1e3 * (time.perf_counter() - start))
                analysis.forward_ms = statistics.median(times)
            result = fit(program, train_x, train_y, settings.epochs, settings.seed)
            row.accuracy, row.step_ms = accuracy(program, val_x, val_y), result.median_step_ms
            _save(path, analysis)
            if progress:
                progress(done, total, f"{row.option.key}: gain {100 * row.gain(analysis.baseline_accuracy):+.1f} "
                                      f"points, {row.step_ms:.1f} ms/step")
    return analysis


def _planned_chunks(rows: list[OptionRow], kept: dict, plan):
    """``[(row, its plan)]`` lists covering ``rows`` in order: plans kept from the cost pass where
    there is one, else planned again; a list closes when its folded weights would pass
    :data:`KEEP_PLANNED_BYTES`."""
    chunk, held = [], 0
    for row in rows:
        planned = kept.pop(row.option.key, None) or plan(row)
        folded = int(planned.report.planned.get("folded_bytes", 0))
        if chunk and held + folded > KEEP_PLANNED_BYTES:
            yield chunk
            chunk, held = [], 0
        chunk.append((row, planned))
        held += folded
    if chunk:
        yield chunk


def _dominated(row: OptionRow, rows: list[OptionRow]) -> bool:
    """Whether a larger ratio of the same weight plans no more memory (it updates more for the same cost:
    the search would take it instead, so this option's fine-tune is not worth running)."""
    return any(r.option.group == row.option.group and r.option.ratio > row.option.ratio and r.memory <= row.memory
               for r in rows)


def _load(path: Path | None, key: str) -> Analysis | None:
    if path is None or not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("version") != CACHE_VERSION or data.get("key") != key:
            return None
        return Analysis.from_json(data)
    except (ValueError, KeyError, TypeError) as err:  # a damaged cache is measured again, not trusted
        logger.warning("search: ignoring the unreadable contribution cache '%s' (%s)", path, err)
        return None


def _save(path: Path | None, analysis: Analysis) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, analysis.to_json())
