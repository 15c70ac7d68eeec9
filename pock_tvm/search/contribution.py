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
from ..training.finetune import fit, predict
from ..runtime.files import write_json
from .space import LORA, Option, options_for, scheme_of

logger = logging.getLogger(__name__)
CACHE_VERSION = 1
# the plans of one run are kept for the fine-tunes (each option is planned once, not twice) while
# their folded frozen weights stay under this many bytes; beyond it an option is planned again
KEEP_PLANNED_BYTES = 256 << 20


@dataclass(frozen=True)
class AnalysisSettings:
    """How each option is fine-tuned. The defaults suit a few hundred labelled samples.

    ``loss``: ``cross_entropy`` scores an option by validation accuracy, ``next_token`` (a causal
    LM) by minus the mean next-token loss on the validation split (its gain is in nats per token).
    For a large model: ``samples`` fine-tunes each option on at most that many training samples,
    ``last_blocks`` offers only the options of the last that many blocks (LoRA's always), and
    ``metric="loss"`` scores a classifier by minus its held-out cross-entropy: continuous, where
    a small validation split moves accuracy in steps of one sample. ``time_budget_s`` stops the
    analysis after that many seconds (what was measured is kept and
    cached; run again to go on; not part of the cache key), ``lora_ranks`` are the LoRA options'
    ranks (:data:`~.transformer_space.LORA_RANKS` when None, none when empty)."""

    epochs: int = 6
    optimizer: SGD | Adam = field(default_factory=lambda: Adam(lr=1e-3))
    loss: str = "cross_entropy"
    val_fraction: float = 0.25
    seed: int = 0
    samples: int | None = None
    last_blocks: int | None = None
    time_budget_s: float | None = None
    lora_ranks: tuple[int, ...] | None = None  # LoRA options' ranks (None: LORA_RANKS; () none)
    metric: str | None = None  # "accuracy" or "loss" (None: accuracy, loss for next_token)

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"search: val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.epochs < 1:
            raise ValueError(f"search: epochs must be at least 1, got {self.epochs}")
        for name in ("samples", "last_blocks"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"search: {name} must be a positive integer or None, got {value!r}")
        if self.lora_ranks is not None:
            object.__setattr__(self, "lora_ranks", tuple(self.lora_ranks))  # a JSON list back to a tuple
            if not all(type(r) is int and r > 0 for r in self.lora_ranks):
                raise ValueError(f"search: lora_ranks must be positive integers, got {self.lora_ranks!r}")
        if self.metric not in (None, "accuracy", "loss") or (self.metric == "accuracy" and self.loss == "next_token"):
            raise ValueError(f"search: metric must be 'accuracy' or 'loss' ('loss' for next_token), got {self.metric!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"search: time_budget_s must be positive seconds or None, got {self.time_budget_s!r}")

    @property
    def scored_by_loss(self) -> bool:
        """Whether gains are drops of the held-out loss (nats) rather than of accuracy."""
        return self.metric == "loss" or self.loss == "next_token"

    def to_json(self) -> dict:
        """The settings (the options left at None left out: a CNN analysis keeps its cache key)."""
        data = {**asdict(self), "optimizer": asdict(self.optimizer)}
        return {k: v for k, v in data.items() if v is not None or k not in _OPTIONAL}

    def key_json(self) -> dict:
        """What the cache key hashes: the settings that change a measurement."""
        return {k: v for k, v in self.to_json().items() if k != "time_budget_s"}

    @staticmethod
    def from_json(data: dict) -> AnalysisSettings:
        return AnalysisSettings(**{**data, "optimizer": optimizer_from_json(data["optimizer"])})


_OPTIONAL = ("samples", "last_blocks", "time_budget_s", "lora_ranks", "metric")


@dataclass
class OptionRow:
    option: Option
    memory: int  # planned training bytes of the step applying this option alone
    backward_flops: int
    accuracy: float | None = None  # validation score after the short fine-tune (AnalysisSettings.loss)
    step_ms: float | None = None  # median step time of that fine-tune on this machine
    step_estimated: bool = False  # step_ms scaled from a shared program's by FLOPs (transformer options)

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
    baseline_accuracy: float | None = None  # validation score before any update
    forward_ms: float | None = None  # median time of one batch's forward on this machine
    forward_flops: int = 0
    seconds: float = 0.0  # time spent analysing, over every run that added to this analysis

    def row(self, key: str) -> OptionRow | None:
        return next((r for r in self.rows if r.option.key == key), None)

    def unmeasured(self) -> list[OptionRow]:
        """Rows whose gain is not known (over the budget alone, or the time budget ran out)."""
        return [r for r in self.rows if r.accuracy is None]

    def to_json(self) -> dict:
        return {"version": CACHE_VERSION, "key": self.key, "settings": self.settings.to_json(),
                "inference_bytes": self.inference_bytes, "baseline_accuracy": self.baseline_accuracy,
                "forward_ms": self.forward_ms, "forward_flops": self.forward_flops, "seconds": round(self.seconds, 1),
                "rows": [r.to_json() for r in self.rows]}

    @staticmethod
    def from_json(data: dict) -> Analysis:
        return Analysis(data["key"], AnalysisSettings.from_json(data["settings"]), data["inference_bytes"],
                        [OptionRow.from_json(r) for r in data["rows"]], data.get("baseline_accuracy"),
                        data.get("forward_ms"), data.get("forward_flops", 0), data.get("seconds", 0.0))


def split(x, y: np.ndarray, settings: AnalysisSettings):
    """``(train_x, train_y, val_x, val_y)``: a seeded split, ``val_fraction`` of the samples held out;
    ``x`` an array or a tuple of arrays (token ids and mask); the training part cut to
    ``settings.samples`` when set."""
    order = np.random.default_rng(settings.seed).permutation(len(y))
    n_val = max(1, int(round(settings.val_fraction * len(y))))
    val, train = order[:n_val], order[n_val:]
    if settings.samples is not None:
        train = train[:settings.samples]
    take = (lambda rows: tuple(a[rows] for a in x)) if isinstance(x, tuple) else (lambda rows: x[rows])
    return take(train), y[train], take(val), y[val]


def analysis_key(imported, x, y: np.ndarray, settings: AnalysisSettings) -> str:
    """Hash of the model (its graph and weights), the data and the settings."""
    h = hashlib.sha256()
    h.update(imported.mod["forward"].script().encode())
    for p in imported.params:
        h.update(p.name.encode())
        h.update(np.ascontiguousarray(p.value).tobytes())
    for a in (*(x if isinstance(x, tuple) else (x,)), y):
        h.update(str((a.shape, a.dtype)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps(settings.key_json(), sort_keys=True).encode())
    return h.hexdigest()[:20]


def score(program, x, y: np.ndarray, settings: AnalysisSettings) -> float:
    """The validation score the analysis compares: accuracy, or minus the mean (next-token) loss."""
    from ..training.finetune import accuracy, classification_loss, next_token_loss

    if settings.loss == "next_token":
        return -next_token_loss(program, x, y)
    return -classification_loss(program, x, y) if settings.scored_by_loss else accuracy(program, x, y)


def analyze(model, x, y: np.ndarray, *, batch: int, settings: AnalysisSettings = AnalysisSettings(),
            budget: int | None = None, cache_dir: str | Path | None = None, progress=None,
            target: str = "host") -> Analysis:
    """Costs of every option of ``model`` (a torch module, an ONNX path or an ``ImportedModel``) and
    gains of those whose own planned memory is within ``budget`` bytes (all when ``None``),
    fine-tuned on ``(x, y)`` at ``batch`` samples per step (``x``: an array, or a tuple of arrays
    such as token ids and attention mask). ``progress(done, total, text)`` is called after each
    measurement. With ``cache_dir`` the results are cached there.

    A transformer's options are fine-tuned on one program compiled for all of them together: after
    every step, the tensors the option does not train are set back to the model's, so each
    option's fine-tune is its own (Adam is per element) and only one step is compiled. Their step
    time is that program's, scaled by FLOPs (forward + the option's backward). LoRA options are
    compiled and timed each on its own."""
    import torch

    from ..compiler.step import build_many, plan_step

    started = time.monotonic()
    deadline = None if settings.time_budget_s is None else started + settings.time_budget_s
    xs = tuple(np.ascontiguousarray(a, dtype="float32" if np.issubdtype(np.asarray(a).dtype, np.floating) else None)
               for a in (x if isinstance(x, (tuple, list)) else (x,)))
    x = xs if isinstance(x, (tuple, list)) else xs[0]
    y = np.asarray(y)
    train_x, train_y, val_x, val_y = split(x, y, settings)
    if len(train_y) < batch:
        raise ValueError(f"search: the training split has {len(train_y)} samples, fewer than one batch of "
                         f"{batch}; give more data or a smaller batch")
    example = tuple(torch.from_numpy(np.ascontiguousarray(a[:batch])) for a in xs)
    imported = import_model(model, example)
    key = analysis_key(imported, x, y, settings)
    path = Path(cache_dir) / f"contributions-{key}.json" if cache_dir is not None else None
    analysis = _load(path, key)
    options = options_for(imported, settings.last_blocks, settings.lora_ranks)
    transformer = any(o.reach >= 0 for o in options)
    # a transformer's options from the output back: what a time budget leaves out is the deepest
    measure_order = sorted(options, key=lambda o: -o.reach) if transformer else options

    def plan(scheme):
        return plan_step(imported, scheme=scheme, loss=settings.loss, optimizer=settings.optimizer,
                         target=target, baseline=False)

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() > deadline

    def save() -> None:
        analysis.seconds += time.monotonic() - save.mark
        save.mark = time.monotonic()
        _save(path, analysis)
    save.mark = started

    todo_cost = [o for o in measure_order if analysis is None or analysis.row(o.key) is None]
    total = len(todo_cost) + len(options)
    done = 0
    kept, kept_bytes = {}, 0  # option -> its plan, for its fine-tune
    for option in todo_cost:
        if out_of_time():
            break
        planned = plan(scheme_of([option], option.key))
        report = planned.report
        if analysis is None:
            analysis = Analysis(key, settings, report.inference_bytes(), [])
        if option.group != LORA:  # adapters add their own forward FLOPs: the model's is any other option's
            analysis.forward_flops = int(report.sparse["forward_flops"])
        analysis.rows.append(OptionRow(option, report.training_bytes(), int(report.sparse["backward_flops"])))
        save()
        folded = int(report.planned.get("folded_bytes", 0))
        if (budget is None or report.training_bytes() <= budget) and kept_bytes + folded <= KEEP_PLANNED_BYTES \
                and (not transformer or option.group == LORA):
            kept[option.key], kept_bytes = planned, kept_bytes + folded
        done += 1
        if progress:
            progress(done, total, f"planned {option.key}: {report.training_bytes() / 2**20:.2f} MiB")
    if analysis is None:
        raise ValueError(f"search: the time budget of {settings.time_budget_s:g} s ended before any option was "
                         "planned; raise it")
    order = {o.key: i for i, o in enumerate(measure_order)}
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
    data = (train_x, train_y, val_x, val_y)
    if transformer:
        shared = [row for row in todo if row.option.group != LORA]
        own = [row for row in todo if row.option.group == LORA]
        if shared and not out_of_time():
            done = _finetune_shared(analysis, imported, shared, plan, data, settings, batch, progress, done, total,
                                    out_of_time, save)
    else:
        own = todo
    # the options' steps are built together (build_many: code generation overlaps), then fine-tuned
    # one by one, so that no build runs while a step is timed
    for chunk in _planned_chunks([] if out_of_time() else own, kept,
                                 lambda row: plan(scheme_of([row.option], row.option.key))):
        if out_of_time():
            break
        programs = build_many([planned for _, planned in chunk])
        for (row, _), program in zip(chunk, programs):
            if out_of_time():
                break
            done += 1
            _baseline(analysis, program, val_x, val_y, batch, settings)
            result = fit(program, train_x, train_y, settings.epochs, settings.seed)
            row.accuracy, row.step_ms = score(program, val_x, val_y, settings), result.median_step_ms
            save()
            if progress:
                progress(done, total, f"{row.option.key}: {_gain_text(analysis, row)}, {row.step_ms:.1f} ms/step")
    save()
    if out_of_time() and progress:
        left = len([r for r in analysis.unmeasured() if budget is None or r.memory <= budget]) \
            + len(options) - len(analysis.rows)
        progress(total, total, f"time budget spent: {left} options not measured (run again to go on)")
    return analysis


def _baseline(analysis: Analysis, program, val_x, val_y, batch: int, settings: AnalysisSettings) -> None:
    """The score before any update and one batch's forward time, once (``program`` untrained)."""
    if analysis.baseline_accuracy is not None:
        return
    analysis.baseline_accuracy = score(program, val_x, val_y, settings)
    first = tuple(a[:batch] for a in val_x) if isinstance(val_x, tuple) else val_x[:batch]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        predict(program, first)
        times.append(1e3 * (time.perf_counter() - start))
    analysis.forward_ms = statistics.median(times)


def _gain_text(analysis: Analysis, row: OptionRow) -> str:
    gain = row.gain(analysis.baseline_accuracy)
    if analysis.settings.scored_by_loss:
        return f"gain {gain:+.4f} nats"
    return f"gain {100 * gain:+.1f} points"


def _finetune_shared(analysis, imported, rows, plan, data, settings, batch, progress, done, total, out_of_time,
                     save) -> int:
    """Fine-tune every option of ``rows`` on one program that trains all of them (their union at full
    ratio); after each step the tensors an option does not train (or a partial weight's other
    channels) are set back to the model's. Returns the progress count."""
    from ..compiler.step import build
    from ..scheme import Rule, Scheme

    train_x, train_y, val_x, val_y = data
    union = Scheme("analysis", rules=[Rule(s, "full") for s in dict.fromkeys(r.option.select for r in rows)])
    planned = plan(union)
    program = build(planned)
    union_flops = analysis.forward_flops + int(planned.report.sparse["backward_flops"])
    _baseline(analysis, program, val_x, val_y, batch, settings)
    start = program.trained_tensors()
    for row in rows:
        if out_of_time():
            break
        done += 1
        keep = _kept_back(program, imported, row.option)
        program.load_trained_tensors(start)
        program.reset_optimizer()

        def restore(p, keep=keep):
            values = p.trained_tensors()
            for var, where in keep.items():
                values[var][where] = start[var][where]
            p.load_trained_tensors(values)

        result = fit(program, train_x, train_y, settings.epochs, settings.seed, after_step=restore)
        row.accuracy = score(program, val_x, val_y, settings)
        row.step_ms = result.median_step_ms * (analysis.forward_flops + row.backward_flops) / max(union_flops, 1)
        row.step_estimated = True
        save()
        if progress:
            progress(done, total, f"{row.option.key}: {_gain_text(analysis, row)}, ~{row.step_ms:.1f} ms/step")
    program.load_trained_tensors(start)
    return done


def _kept_back(program, imported, option) -> dict:
    """``{runtime name: index}`` of what ``option`` does not train among ``program``'s trained
    tensors: a whole tensor, or the channels past a partial update's."""
    updates = scheme_of([option]).resolve(imported)
    keep = {}
    for p in program.layout.trainable:
        update = updates.get(p.source)
        if update is None or update.mode == "frozen":
            keep[p.var] = (...,)
        elif update.mode == "partial":
            index = [slice(None)] * len(p.shape)
            index[update.axis] = slice(update.channels, None)
            keep[p.var] = tuple(index)
    return keep


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
