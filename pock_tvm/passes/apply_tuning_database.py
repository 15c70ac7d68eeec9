"""ApplyTuningDatabase: kernels held by a MetaSchedule JSON database get their tuned schedule.

Contract: the same as ``relax.transform.MetaScheduleApplyDatabase(work_dir)`` (kernels the database
does not hold are left as they are, for ``ScheduleForCPU``), but the database is read from disk once
per process and directory (again only when its files change), not on every compile: a scheme search
plans dozens of steps against the same database.
"""

from __future__ import annotations

import functools
from pathlib import Path

import tvm
from tvm import relax

from .utils import with_functions


@functools.lru_cache(maxsize=8)
def _database(work_dir: str, stamp: tuple):
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(work_dir=work_dir)


def _stamp(work_dir: str) -> tuple:
    files = sorted(Path(work_dir).glob("database_*.json"))
    return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)


@tvm.transform.module_pass(opt_level=0, name="ApplyTuningDatabase")
class ApplyTuningDatabase:
    def __init__(self, work_dir: str) -> None:
        self.work_dir = str(work_dir)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        # the database holds kernels as `pock-tvm tune` saw them, without the frozen-operand
        # attribute (MarkFrozenOperands): looked up without it, given it back after
        marks = {gv: f.attrs[_LAYOUT_FREE] for gv, f in mod.functions.items()
                 if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and _LAYOUT_FREE in f.attrs}
        if marks:
            mod = with_functions(mod, {gv: mod[gv].without_attr(_LAYOUT_FREE) for gv in marks})
        with _database(self.work_dir, _stamp(self.work_dir)):
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        return with_functions(mod, {gv: mod[gv].with_attr(_LAYOUT_FREE, marks[gv]) for gv in marks})


_LAYOUT_FREE = "layout_free_buffers"
