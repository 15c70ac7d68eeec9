"""ScheduleForCPU: a default schedule for every CPU kernel, so an untuned step is not a set of
single-threaded scalar loops. The rules themselves live in :mod:`.cpu_rules`, one per file."""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir
from tvm.s_tir.schedule import ScheduleError

from ..analysis.kernel_check import RULES_ATTR
from .cpu_rules import CPU, FALLBACK_REDUCTION_RULES, REDUCTION_RULES, SPATIAL_RULES, Nest
from .cpu_rules.nest import REDUCE
from .utils import SCHEDULED, is_scheduled, with_functions

logger = logging.getLogger(__name__)


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.ScheduleForCPU")
class ScheduleForCPU:
    """Reads the fused TIR kernels (after ``InlineKernelIntermediates``) and the current target;
    schedules each kernel that has no schedule yet (no ``tirx.is_scheduled`` attribute), block by
    block, with the first rule that applies: for a block with a reduction, the rules of
    ``cpu_rules.REDUCTION_RULES`` (vectorized reduction, channel-vectorized, register-tiled, small
    window, plain reduction), else ``cpu_rules.SPATIAL_RULES`` (epilogue, spatial). Each rule's
    docstring says what it matches and how it schedules.

    The vector width and register count come from the target (``cpu_rules.CPU.of``: a table by ISA;
    ``lanes``/``min_parallel_work``/``short_reduction`` override it). The two outermost remaining
    loops are fused and parallel when a block does at least ``min_parallel_work`` iterations.

    A schedule never changes what a kernel computes (TVM's schedule primitives keep semantics; sums
    may be added in another order). When a tiled rule fails on a kernel, the kernel gets the plain
    rules; a kernel no rule can schedule (plain-loop kernels without blocks, unusual loop nests)
    keeps its loops. Scheduled kernels get ``tirx.is_scheduled``, so a tuning database applied
    earlier wins, and ``pock_tvm.schedule_rules``, the rule of each block, so ``VerifySchedules``
    can name a wrong one. For CPU targets; GPU targets use ``ScheduleForGPU``.
    """

    def __init__(self, lanes: int | None = None, min_parallel_work: int | None = None,
                 short_reduction: int | None = None, reduction_rules=REDUCTION_RULES,
                 spatial_rules=SPATIAL_RULES):
        self.overrides = {"lanes": lanes, "min_parallel_work": min_parallel_work, "short_reduction": short_reduction}
        self.reduction_rules = tuple(reduction_rules)
        self.spatial_rules = tuple(spatial_rules)

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        cpu = self.cpu()
        updates, skipped = {}, []
        for gvar, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc) or is_scheduled(func):
                continue
            scheduled = self.schedule(func, cpu=cpu)
            if scheduled is None:
                skipped.append(gvar.name_hint)
            else:
                updates[gvar] = scheduled
        if not updates:
            return mod
        mod = with_functions(mod, updates)
        logger.info("ScheduleForCPU: %d kernels scheduled, %d kept as loops%s", len(updates), len(skipped),
                    f" ({', '.join(skipped[:5])})" if skipped else "")
        return mod

    def cpu(self) -> CPU:
        """The current target as the rules see it, with this pass's overrides."""
        return CPU.of(None, **self.overrides)

    def schedule(self, func: tvm.tirx.PrimFunc, plain_only: bool = False,
                 cpu: CPU | None = None) -> tvm.tirx.PrimFunc | None:
        """``func`` scheduled, marked scheduled and with the rules that scheduled it (one per block,
        in the attribute ``pock_tvm.schedule_rules``), or None if no rule applies. ``plain_only``:
        only the plain reduction rule (the fallback when a tiled rule fails or computes wrong)."""
        found = self._apply(s_tir.Schedule(func), plain_only, cpu or self.cpu())
        if found is None:
            return None
        sch, rules = found
        return sch.mod["main"].with_attrs({SCHEDULED: True, RULES_ATTR: ",".join(rules)})

    def apply(self, sch: s_tir.Schedule, plain_only: bool = False) -> s_tir.Schedule | None:
        """The kernel ``main`` of ``sch`` scheduled (a traced copy, so it can be stored as a tuning
        record), or None if no rule applies. ``sch`` itself is not changed."""
        found = self._apply(sch, plain_only, self.cpu())
        return found[0] if found is not None else None

    def _apply(self, sch: s_tir.Schedule, plain_only: bool, cpu: CPU) -> tuple[s_tir.Schedule, list[str]] | None:
        choices = (FALLBACK_REDUCTION_RULES,) if plain_only else (self.reduction_rules, FALLBACK_REDUCTION_RULES)
        for reduction_rules in choices:
            work = sch.copy()
            try:
                done = [_first(work, block, reduction_rules if _reduces(work, block) else self.spatial_rules, cpu)
                        for block in work.get_child_blocks(work.get_sblock("root"))]
            except (ScheduleError, RuntimeError, ValueError, IndexError) as err:  # TVM raises its errors as these
                func = sch.mod["main"]
                logger.info("ScheduleForCPU: a rule failed on %s: %s", func.attrs.get("global_symbol", "?")
                            if func.attrs else "?", str(err).splitlines()[0] if str(err) else type(err).__name__)
                continue
            rules = [rule for rule in done if rule]
            return (work, rules) if rules else None
        return None


def _reduces(sch, block) -> bool:
    return any(int(iv.iter_type) == REDUCE for iv in sch.get(block).iter_vars)


def _first(sch, block, rules, cpu: CPU) -> str | None:
    """The name of the rule that scheduled ``block`` (the first that applies), or None."""
    nest = Nest.of(sch, block)
    if nest is None:
        return None
    return next((rule.name for rule in rules if rule.apply(sch, nest, cpu)), None)
