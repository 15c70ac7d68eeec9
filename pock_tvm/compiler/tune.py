"""``pock-tvm tune``: MetaSchedule autotuning (XGBoost cost model) of the kernels a training step
spends its time in, into a tuning database that ``compile(..., tuning_database=)`` applies.

The step is profiled first (with the database's schedules so far), then the slowest kernels that
the database does not hold yet are tuned one at a time, each committed to the database when done:
interrupting loses at most the kernel being tuned, and running the same command again continues.
A database is per target (MetaSchedule's JSON files in one directory); kernels are matched by
structure, so one database serves every model, scheme and batch that contains the same kernels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi

from ..analysis.kernel_check import check_record, compare, host_target
from ..passes.prepack_frozen_weights import LAYOUT_FREE
from ..options import PipelineOptions
from ..targets.presets import load_target
from .step import compile
from ..runtime.files import write_json
from ..runtime.profile import profile_program
from ..tvmscript import import_tensor_intrinsics
from .tuning_device import TuningDevice

logger = logging.getLogger(__name__)
# the kernels to tune are ranked by a profile of at least RANKING_MS of steps (RANKING_STEPS at least,
# RANKING_STEPS_MAX at most), so that a second run over the same model picks the same kernels
RANKING_STEPS, RANKING_MS, RANKING_STEPS_MAX = 5, 2000.0, 400


@dataclass
class TunedKernel:
    name: str
    share: float  # of the profiled step, before tuning
    default_ms: float | None  # one call, with the default schedule (measured here)
    tuned_ms: float | None  # one call, best measured by MetaSchedule
    trials: int
    seconds: float
    status: str  # "tuned", "already in the database", "no schedule found"


def tune_target(target: tvm.target.Target, device: TuningDevice | None = None) -> tvm.target.Target:
    """MetaSchedule wants the number of cores of a CPU target: this machine's when tuning here,
    else the preset's ``num-cores`` (or 4, a typical board)."""
    config = dict(target.export())
    if config.get("kind") == "llvm" and "num-cores" not in config:
        config["num-cores"] = (os.cpu_count() or 1) if device is None or device.is_local else 4
    return tvm.target.Target(config)


def tune(model, example_inputs=None, *, database: str | Path, kernels: int = 10, trials: int = 16,
         report: Callable[[str], None] = print, seed: int = 0, device: TuningDevice | None = None,
         **compile_args) -> list[TunedKernel]:
    """Tune the ``kernels`` slowest kernels of the compiled step of ``model`` with ``trials``
    MetaSchedule trials each, into ``database`` (created if missing). ``compile_args`` are those of
    :func:`pock_tvm.compile` (scheme, loss, optimizer, target, input_shapes, options).

    ``device`` says where candidates are measured (default: this machine). For a target that does
    not run here, give a device (``TuningDevice(rpc="HOST:PORT")`` or a tracker); its kernels are
    then ranked by the profile of the same step on this machine, and measured on the device."""
    from tvm.s_tir import meta_schedule as ms

    device = device or TuningDevice()
    if kernels < 1 or trials < 1:
        raise ValueError(f"tune: kernels and trials must be at least 1, got {kernels} and {trials}")
    preset = _tunable(compile_args.get("target", "host"), device)
    database = Path(database)
    database.mkdir(parents=True, exist_ok=True)
    # which kernels: the slowest with default schedules, so that a second run picks the same ones
    program = compile(model, example_inputs, tuning_database=False, **compile_args)
    target = tune_target(tvm.target.Target(program.extra["target"]["tvm_target"]), device)
    ranked = program if program.runs_here else compile(
        model, example_inputs, tuning_database=False, **{**compile_args, "target": "host"})
    step_ms, rows = profile_program(ranked)
    if step_ms * RANKING_STEPS < RANKING_MS:  # a short step: rank by a longer profile, or the order is noise
        step_ms, rows = profile_program(ranked, min(RANKING_STEPS_MAX, int(RANKING_MS / max(step_ms, 1e-3))))
    report(f"step {step_ms:.2f} ms with default schedules on this machine; {len(rows)} kernels; "
           f"measuring on {device.describe()}")
    logs = _log_dir()
    # the kernels as the tuning database sees them: before any schedule
    options = replace(PipelineOptions.load(compile_args.pop("options", None)), schedule_kernels=False)
    plain = compile(model, example_inputs, options=options, **compile_args).ir
    rows = _keep_ranking(database, plain, target, rows)
    builder, runner = device.builder(preset), device.runner()
    db = ms.database.JSONDatabase(work_dir=str(database))
    results, spent_per_trial = [], None
    chosen = [r for r in rows if r.name in {g.name_hint for g in plain.functions}][:kernels]
    for index, row in enumerate(chosen):
        # as ApplyTuningDatabase looks kernels up: without the frozen-operand mark
        mod = tvm.IRModule({"main": plain[row.name].without_attr(LAYOUT_FREE).with_attr("global_symbol", "main")})
        if db.has_workload(mod):
            default_ms = _commit_default(db, mod, target, device, builder, runner)
            results.append(TunedKernel(row.name, row.share, default_ms, _best_ms(db, mod), 0, 0.0,
                                       "already in the database"))
            report(f"[{index + 1}/{len(chosen)}] {row.name}: already in the database")
            continue
        start = time.perf_counter()
        scratch = ms.database.MemoryDatabase()  # a kernel lands in the database only when tuned:
        _quiet_meta_schedule()  # before every run: each one adds its console handler again
        import_tensor_intrinsics()  # (MetaSchedule would, 6x slower)
        ms.tir_integration.tune_tir(  # an interrupted one is tuned again by the next run
            mod, target, str(logs), max_trials_global=trials, num_trials_per_iter=min(trials, 16),
            database=scratch, builder=builder, runner=runner, cost_model="xgb", seed=seed,
            strategy=_search(trials))
        seconds = time.perf_counter() - start
        spent_per_trial = seconds / trials
        _copy_records(scratch, db)
        default_ms = _commit_default(db, mod, target, device, builder, runner)
        best = _best_ms(db, mod)
        left = (len(chosen) - index - 1) * trials * spent_per_trial
        results.append(TunedKernel(row.name, row.share, default_ms, best, trials, seconds,
                                   "tuned" if best is not None else "no schedule found"))
        report(f"[{index + 1}/{len(chosen)}] {row.name} ({100 * row.share:.1f}% of the step): "
               f"{'%.3f ms' % default_ms if default_ms is not None else 'no default schedule'} per call "
               f"with the default schedule -> "
               f"{'%.3f ms tuned' % best if best is not None else 'no valid schedule'}; "
               f"{trials} trials in {seconds:.0f} s, about {left / 60:.1f} min left")
    return results


RANKING_FILE = "pock_tvm_ranking.json"


def _keep_ranking(database: Path, plain: tvm.IRModule, target, rows: list) -> list:
    """``rows`` in the order the first run over the same kernels and target ranked them (kept in
    :data:`RANKING_FILE` beside the database): kernels of similar time swap places between two
    profiles, and a second run must pick the kernels the first one tuned, not tune a neighbour."""
    digest = hashlib.sha256(str(target).encode())
    for gvar, func in sorted(plain.functions.items(), key=lambda kv: kv[0].name_hint):
        if isinstance(func, tvm.tirx.PrimFunc):
            digest.update(f"{gvar.name_hint}:{tvm_ffi.structural_hash(func)};".encode())
    key, path = digest.hexdigest()[:24], database / RANKING_FILE
    try:
        stored = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:  # a damaged file is ranked again, not trusted
        stored = {}
    order = stored.get(key)
    if isinstance(order, list) and {r.name for r in rows} <= set(order):
        return sorted(rows, key=lambda r: order.index(r.name))
    write_json(path, {**stored, key: [r.name for r in rows]})
    return rows


def refresh_defaults(database: str | Path, *, target: str = "host", device: TuningDevice | None = None,
                     report: Callable[[str], None] = print) -> int:
    """Measure the current default schedule of every kernel in ``database`` and store it as one more
    candidate (after ``ScheduleForCPU`` changed, a database's old best may be slower than the new
    default, and the database wins at compile time). Returns how many kernels were measured."""
    from tvm.s_tir import meta_schedule as ms

    device = device or TuningDevice()
    preset = _tunable(target, device)
    if not (Path(database) / "database_workload.json").is_file():
        raise ValueError(f"tune: no tuning database in '{database}' (database_workload.json is missing)")
    from ..targets.toolchain import tvm_target

    tgt = tune_target(tvm_target(preset), device)
    db = ms.database.JSONDatabase(work_dir=str(database))
    builder, runner = device.builder(preset), device.runner()
    seen, measured = set(), 0
    for record in db.get_all_tuning_records():
        key = str(record.workload.as_json()[0])  # the structural hash of the kernel
        if key in seen:
            continue
        seen.add(key)
        ms_default = _commit_default(db, record.workload.mod, tgt, device, builder, runner)
        best = _best_ms(db, record.workload.mod)
        measured += ms_default is not None
        report(f"[{len(seen)}] default {ms_default if ms_default is None else round(ms_default, 4)} ms, "
               f"best {best if best is None else round(best, 4)} ms")
    return measured


def _tunable(target, device: TuningDevice):
    """The preset of ``target``, if its kernels can be tuned on ``device``."""
    preset = load_target(target)
    if preset.device != "cpu":
        raise ValueError(f"tune: tunes CPU kernels (LLVM targets); {preset.name} runs on {preset.device} "
                         "(GPU targets get DLight schedules)")
    if device.is_local and preset.is_cross:
        raise ValueError(f"tune: target {preset.name} does not run on this machine; measure its kernels "
                         "on the device: --rpc HOST:PORT (`pock_runner serve --allow-remote-code` there) "
                         "or --tracker HOST:PORT --key KEY")
    return preset


def _quiet_meta_schedule() -> None:
    """MetaSchedule logs every round to the console: keep warnings only, and drop unnamed
    handlers, which its logging setup cannot name (its own logs go to ``_log_dir()``)."""
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_logger.setLevel(logging.WARNING)
    for handler in list(ms_logger.handlers):
        if handler.get_name() is None:
            ms_logger.removeHandler(handler)


def _log_dir() -> Path:
    """Where MetaSchedule writes its logs: under the cache, not the console or the database."""
    from ..cache import cache_dir

    logs = cache_dir() / "tune-logs"
    logs.mkdir(parents=True, exist_ok=True)
    return logs


def _search(trials: int):
    """MetaSchedule's evolutionary search, its population scaled to the trials it may measure:
    its defaults (512 candidates, 50 random ones) from 16 trials up, 32 candidates a trial below
    (2 trials: 64, where the full population took a minute to evolve for two measurements)."""
    from tvm.s_tir import meta_schedule as ms

    return ms.search_strategy.EvolutionarySearch(population_size=min(512, 32 * trials),
                                                 init_min_unmeasured=min(50, 4 * trials))


def _commit_default(db, mod: tvm.IRModule, target, device: TuningDevice, builder, runner) -> float | None:
    """Store the default schedule (``ScheduleForCPU``) of ``mod``, measured on the tuning device,
    as one more candidate of its workload, so that the database's best is never slower than the
    default. Returns its time per call in ms (None if the default does not schedule it)."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from ..passes import ScheduleForCPU

    with target:  # the rules' vector width and tiles are the target's (ISA table), as when compiling
        sch = ScheduleForCPU().apply(s_tir.Schedule(mod))
    if sch is None:
        return None
    check = compare("main", mod["main"], sch.mod["main"], host_target())
    if check is not None and not check.ok:
        logger.warning("tune: the default schedule is not stored: %s", check.describe())
        return None
    workload = db.commit_workload(mod)
    trace = str(sch.trace)
    for record in db.get_top_k(workload, 1 << 10):
        if str(record.trace) == trace and record.run_secs:
            return 1e3 * float(np.mean([float(s) for s in record.run_secs]))
    seconds = device.measure(sch.mod, target, builder, runner)
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, workload, run_secs=[seconds], target=target,
        args_info=ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    return 1e3 * seconds


def _copy_records(source, db) -> None:
    """The measured candidates of ``source`` into ``db``, each first run once against its kernel
    unscheduled: a candidate that computes other numbers never enters the database."""
    from tvm.s_tir import meta_schedule as ms

    for record in source.get_all_tuning_records():
        check = check_record(record)
        if check is not None and not check.ok:
            logger.warning("tune: a MetaSchedule candidate was dropped: %s", check.describe())
            continue
        db.commit_tuning_record(ms.database.TuningRecord(
            record.trace, db.commit_workload(record.workload.mod), run_secs=record.run_secs,
            target=record.target, args_info=record.args_info))


def _best_ms(db, mod) -> float | None:
    if not db.has_workload(mod):
        return None
    records = db.get_top_k(db.commit_workload(mod), 1)
    if not records or not records[0].run_secs:
        return None
    return 1e3 * float(np.mean([float(s) for s in records[0].run_secs]))
