"""InlineKernelIntermediates: a fused kernel computes its elementwise stages on the fly."""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir

from .utils import is_scheduled, with_functions

logger = logging.getLogger(__name__)


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.InlineKernelIntermediates")
class InlineKernelIntermediates:
    """Reads the TIR kernels of a lowered module (after ``FuseTIR``); in each one, every
    injective stage (padding, broadcast, elementwise epilogue) whose result only feeds later
    stages is inlined into its consumers.

    Without a schedule, each stage of a fused kernel writes a full-size scratch buffer: a conv
    with its padding, bias and clip holds three tensors the size of its output while it runs.
    Inlined, only the reduction results (the conv sum itself) stay; the kernel's scratch memory
    (``analysis.memory.kernel_workspace``) drops to about one output. Stages that cannot be
    inlined (reductions, outputs) are kept as they are. Runs before ``AnnotateTIROpPattern``;
    ``pad_into_reductions=False`` keeps padding materialized (faster unscheduled convs).
    """

    def __init__(self, pad_into_reductions: bool = True):
        self.pad_into_reductions = pad_into_reductions

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        inlined = 0
        for gvar, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc) or is_scheduled(func):
                continue
            sch = s_tir.Schedule(func)
            try:
                root = sch.get_sblock("root")
            except s_tir.schedule.ScheduleError:
                continue  # a kernel written as plain loops (the scatter-add of take's gradient): no stages
            count = 0
            for block in sch.get_child_blocks(root):
                if not self.pad_into_reductions and _feeds_reduction(sch, block):
                    continue
                try:
                    sch.compute_inline(block)
                    count += 1
                except s_tir.schedule.ScheduleError:
                    continue  # a reduction, an output, or a stage read in a non-injective way
            if count:
                updates[gvar] = sch.mod["main"]
                inlined += count
        if not updates:
            return mod
        mod = with_functions(mod, updates)
        logger.info("InlineKernelIntermediates: %d stages inlined in %d kernels", inlined, len(updates))
        return mod


def _feeds_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(any(int(iv.iter_type) == 2 for iv in sch.get(c).iter_vars)
               for c in sch.get_consumers(block))
