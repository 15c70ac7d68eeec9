"""VerifySchedules: every scheduled kernel is run against its unscheduled form before it ships."""

from __future__ import annotations

import logging

import tvm

from ..analysis.kernel_check import KernelCheck, compare
from .schedule_for_cpu import ScheduleForCPU
from .utils import with_functions

logger = logging.getLogger(__name__)

# the module attribute that lists what the check found: one line per kernel that was wrong
FINDINGS_ATTR = "pock_tvm.kernel_checks"


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.VerifySchedules")
class VerifySchedules:
    """Runs ``scheduling`` (the passes that give kernels their schedules: ``ApplyTuningDatabase``,
    ``ScheduleForCPU``, ``FastExp``) on the module, then runs every kernel they changed once on
    random inputs against the kernel as it was before (``analysis.kernel_check.compare``, in the
    current target).

    A kernel that computes other numbers than its unscheduled form is replaced by the plain rule's
    schedule (``ScheduleForCPU(plain_only)``) when that one computes right, else by the kernel
    unscheduled; each such kernel is logged as a warning naming the kernel and the rule or tuned
    record, and listed in the module attribute ``pock_tvm.kernel_checks``. Kernels over symbolic
    shapes cannot be run on made-up inputs and are kept as scheduled. Costs two compilations and
    one run per kernel: for ``compile(verify=True)``, off by default.
    """

    def __init__(self, scheduling: list, seed: int = 0):
        self.scheduling = list(scheduling)
        self.seed = seed

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        target = tvm.target.Target.current(allow_none=False)
        before = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
        scheduled = tvm.transform.Sequential(self.scheduling)(mod) if self.scheduling else mod
        findings, replaced, checked = [], {}, 0
        for gvar, func in scheduled.functions.items():
            plain = before.get(gvar.name_hint)
            if plain is None or not isinstance(func, tvm.tirx.PrimFunc) or func.same_as(plain):
                continue
            check = compare(gvar.name_hint, plain, func, target, self.seed)
            if check is None:
                continue
            checked += 1
            if check.ok:
                continue
            replaced[gvar], fallback = self._fallback(gvar.name_hint, plain, target)
            findings.append(f"{check.describe()}; {fallback}")
            logger.warning("VerifySchedules: %s", findings[-1])
        logger.info("VerifySchedules: %d kernels checked against their unscheduled form, %d wrong", checked,
                    len(findings))
        return with_functions(scheduled, replaced).with_attr(FINDINGS_ATTR, findings)

    def _fallback(self, name: str, plain: tvm.tirx.PrimFunc, target) -> tuple[tvm.tirx.PrimFunc, str]:
        simple = ScheduleForCPU().schedule(plain, plain_only=True)
        if simple is not None:
            check: KernelCheck | None = compare(name, plain, simple, target, self.seed)
            if check is not None and check.ok:
                return simple, "it falls back to the plain rule's schedule"
        return plain, "it falls back to its unscheduled loops"
