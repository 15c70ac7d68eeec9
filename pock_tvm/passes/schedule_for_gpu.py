"""ScheduleForGPU: thread bindings for every kernel of a GPU target (DLight rules, robustly)."""

from __future__ import annotations

import logging

import tvm

from .utils import SCHEDULED, is_scheduled, with_functions

logger = logging.getLogger(__name__)


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.ScheduleForGPU")
class ScheduleForGPU:
    """Reads the TIR kernels of a lowered module (after ``FuseTIR``) and the current target;
    gives each unscheduled kernel the schedule of the first DLight GPU rule that applies
    (matmul, GEMV, reduction, general reduction, then the elementwise fallback).

    Unlike ``dlight.ApplyDefaultSchedule``, a rule that fails on a kernel (e.g. the reduction
    rule's read analysis on a training-only kernel) is skipped instead of aborting the build.
    A kernel no rule schedules is an error naming it. Run inside ``with target``.
    """

    def __init__(self, rules: list | None = None):
        self.rules = rules

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        from tvm.s_tir import dlight as dl

        target = tvm.target.Target.current(allow_none=False)
        rules = self.rules if self.rules is not None else [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                               dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
        updates = {}
        for gvar, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc) or is_scheduled(func):
                continue
            updates[gvar] = _schedule(gvar.name_hint, func, target, rules)
        return with_functions(mod, updates)


def _schedule(name: str, func, target, rules):
    for rule in rules:
        try:
            sch = rule.apply(func, target, False)
        except Exception as err:  # noqa: BLE001 -- a DLight rule's analysis can assert on any kernel
            logger.debug("ScheduleForGPU: %s does not apply to %s: %s", type(rule).__name__, name, err)
            continue
        if isinstance(sch, list):
            sch = sch[0] if sch else None
        if sch is not None:
            return sch.mod["main"].with_attr(SCHEDULED, True)
    raise ValueError(f"ScheduleForGPU: no GPU schedule rule applies to kernel {name}; compile for a CPU "
                     "target or report the model that produced it")
