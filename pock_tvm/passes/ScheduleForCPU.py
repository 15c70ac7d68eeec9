"""ScheduleForCPU: a default schedule for every CPU kernel, so an untuned step is not a set of
single-threaded scalar loops."""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir
from tvm.s_tir.schedule import ScheduleError

from .utils import SCHEDULED, is_scheduled

logger = logging.getLogger(__name__)

_DATA_PAR, _REDUCE = 0, 2


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.ScheduleForCPU")
class ScheduleForCPU:
    """Reads the fused TIR kernels (after ``InlineKernelIntermediates``); schedules each block of
    each kernel that has no schedule yet (no ``tirx.is_scheduled`` attribute), by one rule per kind:

    - a reduction block (conv, matmul, their gradients: spatial loops, then reduction loops): the
      innermost spatial loop with extent >= 2 is split by a vector width (a divisor of its extent
      up to ``lanes``), the vector part moves below the reduction loops and is vectorized, the init
      is split off and vectorized too; when the reduction is short (a depthwise 3x3 window, at most
      ``short_reduction`` iterations) the order is kept and only the outer loops are parallel;
    - a spatial block (elementwise, broadcast, injective): all loops fused, split by a vector
      width, the inner part vectorized;
    - the two outermost spatial loops are fused and run in parallel when the block does at least
      ``min_parallel_work`` iterations.

    A schedule never changes what a kernel computes (TVM's schedule primitives keep semantics).
    A kernel any rule cannot schedule (plain-loop kernels without blocks, unusual loop nests)
    keeps its loops as they are. Scheduled kernels get ``tirx.is_scheduled``, so a tuning database
    applied earlier wins. For CPU targets; GPU targets use ``ScheduleForGPU``.
    """

    def __init__(self, lanes: int = 16, min_parallel_work: int = 1 << 14, short_reduction: int = 16):
        self.lanes = lanes
        self.min_parallel_work = min_parallel_work
        self.short_reduction = short_reduction

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates, skipped = {}, []
        for gvar, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc) or is_scheduled(func):
                continue
            scheduled = self._schedule(func)
            if scheduled is None:
                skipped.append(gvar.name_hint)
            else:
                updates[gvar] = scheduled.with_attr(SCHEDULED, True)
        if not updates:
            return mod
        mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
        for gvar, func in updates.items():
            mod[gvar] = func
        logger.info("ScheduleForCPU: %d kernels scheduled, %d kept as loops%s", len(updates), len(skipped),
                    f" ({', '.join(skipped[:5])})" if skipped else "")
        return mod

    def _schedule(self, func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc | None:
        sch = s_tir.Schedule(func)
        return sch.mod["main"] if self.apply(sch) else None

    def apply(self, sch: s_tir.Schedule) -> bool:
        """Schedule the kernel ``main`` of ``sch`` in place (traced, so it can be stored as a tuning
        record); False if no rule applies or a rule fails (then ``sch`` must be discarded)."""
        try:
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
            done = [self._reduction(sch, b) if _kinds(sch, b).count(_REDUCE) else self._spatial(sch, b)
                    for b in blocks]
        except (ScheduleError, RuntimeError, ValueError) as err:  # TVM raises its errors as these
            func = sch.mod["main"]
            logger.info("ScheduleForCPU: %s keeps its loops: %s", func.attrs.get("global_symbol", "?")
                        if func.attrs else "?", str(err).splitlines()[0] if str(err) else type(err).__name__)
            return False
        return any(done)

    def _spatial(self, sch, block) -> bool:
        loops = sch.get_loops(block)
        if not loops or len(loops) != len(_kinds(sch, block)):
            return False
        work = _work(sch, loops)
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        lanes = self._lanes(_extent(sch, fused))
        outer, inner = fused, None
        if lanes == _extent(sch, fused):
            outer, inner = None, fused
        elif lanes:
            outer, inner = sch.split(fused, [None, lanes])
        if outer is not None and work >= self.min_parallel_work:
            sch.parallel(outer)
        if inner is not None:
            sch.vectorize(inner)
        return True

    def _reduction(self, sch, block) -> bool:
        loops, kinds = sch.get_loops(block), _kinds(sch, block)
        if len(loops) != len(kinds) or set(kinds) - {_DATA_PAR, _REDUCE}:
            return False  # one loop per block var, no opaque iterators
        spatial = [lp for lp, k in zip(loops, kinds) if k == _DATA_PAR]
        reduce = [lp for lp, k in zip(loops, kinds) if k == _REDUCE]
        if not spatial:
            return False
        work = _work(sch, loops)
        inner = None
        if _work(sch, reduce) > self.short_reduction:
            index = next((i for i in reversed(range(len(spatial))) if (_extent(sch, spatial[i]) or 0) >= 2), None)
            lanes = self._lanes(_extent(sch, spatial[index])) if index is not None else None
            if lanes:
                vector = spatial[index]
                if lanes == _extent(sch, vector):
                    inner, spatial = vector, spatial[:index] + spatial[index + 1:]
                else:
                    outer_part, inner = sch.split(vector, [None, lanes])
                    spatial = spatial[:index] + [outer_part] + spatial[index + 1:]
        # spatial loops outside, then the reduction, then the vector loop
        sch.reorder(*spatial, *reduce, *([inner] if inner is not None else []))
        if spatial and work >= self.min_parallel_work:
            sch.parallel(sch.fuse(*spatial[:2]) if len(spatial) > 1 else spatial[0])
        if inner is not None:
            sch.vectorize(inner)  # before splitting off the init: vectorize needs the whole reduction block
            init = sch.decompose_reduction(block, reduce[0])
            sch.vectorize(sch.get_loops(init)[-1])
        return True

    def _lanes(self, extent: int | None) -> int | None:
        """The vector width for a loop of ``extent``: all of it when short, else a divisor."""
        if extent is None or extent < 2:
            return None
        if extent <= self.lanes:
            return extent
        return next((v for v in (16, 8, 4, 2) if v <= self.lanes and extent % v == 0), None)


def _kinds(sch, block) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _extent(sch, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tvm.tirx.IntImm) else None


def _work(sch, loops) -> int:
    total = 1
    for loop in loops:
        total *= _extent(sch, loop) or 1
    return total
