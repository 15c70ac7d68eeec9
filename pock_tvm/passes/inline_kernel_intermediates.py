"""InlineKernelIntermediates: a fused kernel computes its elementwise stages on the fly."""

from __future__ import annotations

import logging

import tvm
import tvm_ffi
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
    inlined (reductions, outputs) are kept as they are, and so is a stage that calls a math
    function (``log``, ``exp``, ``sqrt``...) and is read broadcast by a larger consumer (a row's
    ``log`` of its sum, a norm's ``rsqrt``): inlined, it would be computed again for every element
    of the row. Runs before ``AnnotateTIROpPattern``; ``pad_into_reductions=False`` keeps padding
    materialized (faster unscheduled convs).
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
                if _costly_broadcast(sch, block):
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


def _costly_broadcast(sch: s_tir.Schedule, block) -> bool:
    """Whether ``block`` calls a math function and a consumer writes more elements than it does."""
    stmt = sch.get(block)
    if len(stmt.writes) != 1:
        return False
    calls = []

    def collect(node):
        if _is_math(node):
            calls.append(node)
        return node

    tvm_ffi.structural_map(stmt.body, (tvm.ir.Call, collect))
    if not calls:
        return False
    size = _elements(stmt.writes[0].source)
    return any(_elements(w.source) > size for c in sch.get_consumers(block) for w in sch.get(c).writes)


def _is_math(call) -> bool:
    name = getattr(call.op, "name", "")
    return name.startswith("tirx.") and name.split(".", 1)[1] in _MATH


_MATH = {"exp", "exp2", "exp10", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "pow", "tanh", "sigmoid", "erf",
         "sin", "cos", "tan", "atan", "fmod", "expm1"}


def _elements(buffer) -> int:
    total = 1
    for d in buffer.shape:
        if not isinstance(d, tvm.tirx.IntImm):
            return 0
        total *= int(d)
    return total
