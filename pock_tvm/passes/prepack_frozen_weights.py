"""PrepackFrozenWeights: a frozen weight's panel layout is computed once, at compile time.

A matmul's right operand is copied into panels (``cpu_rules.register_tiled.pack``) so that a
register tile walks it contiguously. For a trained weight that copy must run in every call; for a
frozen one (a constant of the step) it is the same every call. ``MarkFrozenOperands`` (before the
schedules) tells the schedule rules which kernel arguments are always constants; the register-tiled
rule then packs such an operand in a stage of its own, marked as a layout rewrite, and
``PrepackFrozenWeights`` (after the schedules) splits that stage into its own kernel and folds it
into the constant: the step reads the packed weight and copies nothing.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, s_tir

from .cpu_rules.register_tiled import PREPROC
from .fold_frozen_kernels import FoldFrozenKernels
from .utils import with_functions

# what TVM's AttachAttrLayoutFreeBuffers writes on a kernel: indices of the arguments every caller
# passes a constant for
LAYOUT_FREE = "layout_free_buffers"


_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.MarkFrozenOperands")
class MarkFrozenOperands:
    """Before the schedules: a kernel gets the attribute ``layout_free_buffers`` (TVM's name, read
    by ``SplitLayoutRewritePreproc``), the indices of the arguments that every one of its calls
    passes a constant for. Unlike TVM's ``AttachAttrLayoutFreeBuffers`` no kernel is duplicated (a
    kernel called with a constant in one place and a variable in another gets no mark for that
    argument): the kernels keep their names and number, and kernels without a constant argument
    are left as they are."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        constant: dict = {}  # kernel -> per argument: constant in every call so far

        def visit(expr):
            if isinstance(expr, relax.Call) and expr.op.same_as(_CALL_TIR) and isinstance(expr.args[1], relax.Tuple):
                flags = [isinstance(a, tvm.ir.GenericConst) for a in expr.args[1].fields]
                known = constant.get(expr.args[0])
                constant[expr.args[0]] = flags if known is None else [a and b for a, b in zip(known, flags)]

        for func in mod.functions.values():
            if isinstance(func, relax.Function):
                relax.analysis.post_order_visit(func, visit)
        marks = {gv: [i for i, c in enumerate(flags) if c] for gv, flags in constant.items()}
        return with_functions(mod, {gv: mod[gv].with_attr(LAYOUT_FREE, idx) for gv, idx in marks.items()
                                    if idx and isinstance(mod[gv], tvm.tirx.PrimFunc)})


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.PrepackFrozenWeights")
class PrepackFrozenWeights:
    """After the schedules: ``relax.transform.SplitLayoutRewritePreproc`` moves every packing
    stage the schedules marked (``meta_schedule.layout_rewrite_preproc``) into a kernel of its own
    called on the constant, then ``FoldFrozenKernels`` evaluates those calls at compile time (once
    per process and weight). A constant that nothing else reads any more is dropped; one that
    another op still reads (a tied embedding: the token lookup and the LM head) stays beside its
    packed copy. The values are unchanged: the same copy, done before instead of during the call."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        marked = {gv: f for gv, f in mod.functions.items()
                  if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and LAYOUT_FREE in f.attrs}
        # TVM's split wants a packing stage for every argument the mark lists: the mark keeps those
        packed = {gv: _packed_arguments(f) for gv, f in marked.items()}
        mod = with_functions(mod, {gv: marked[gv].with_attr(LAYOUT_FREE, packed[gv]) if packed[gv]
                                   else marked[gv].without_attr(LAYOUT_FREE) for gv in marked})
        if not any(packed.values()):
            return mod
        # TVM's split reads every kernel of the module and fails on one written as plain loops (no
        # blocks): it sees the Relax functions and the packed kernels only, the rest is put back after
        aside = {gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and not packed.get(gv)}
        seen = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in aside}, attrs=mod.attrs)
        split = relax.transform.SplitLayoutRewritePreproc()(seen)
        mod = FoldFrozenKernels()(with_functions(split, aside))
        entries = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function)]
        return relax.transform.DeadCodeElimination(entries)(mod)  # the folded packing kernels


def _packed_arguments(func: tvm.tirx.PrimFunc) -> list[int]:
    """Indices of the arguments a packing stage (``PREPROC``) of ``func`` reads."""
    if not len(func.attrs[LAYOUT_FREE]):
        return []  # no constant argument: nothing can have been packed
    read = set()

    def visit(block):
        if PREPROC in block.annotations:
            read.update(r.source.name for r in block.reads)
        return block

    tvm_ffi.structural_map(func.body, (s_tir.SBlock, visit))
    return [i for i, p in enumerate(func.params) if p.name in read]
