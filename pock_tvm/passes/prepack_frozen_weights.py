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
from tvm.relax.expr_functor import PyExprMutator, mutator

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
    passes a constant for. A kernel called with a constant in some calls and a variable in others
    (one matmul shape in 28 frozen layers and 2 trained ones) is copied: the calls of each pattern of
    constant arguments get a kernel of their own, named ``<kernel>_frozen`` (numbered when there are several), with
    its mark; the calls that pass no constant keep the original kernel, unmarked. Kernels without a
    constant argument are left as they are."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        patterns: dict = {}  # kernel -> the patterns of constant arguments its calls have, in call order

        def visit(expr):
            if _is_kernel_call(expr, mod):
                seen = patterns.setdefault(expr.args[0], [])
                if _constant_flags(expr) not in seen:
                    seen.append(_constant_flags(expr))

        for func in mod.functions.values():
            if isinstance(func, relax.Function):
                relax.analysis.post_order_visit(func, visit)
        kernels, copies, route = {}, [], {}  # route: (kernel, pattern) -> the copy those calls use
        for gv, seen in patterns.items():
            marked = [p for p in seen if any(p)]
            if len(seen) == 1 and marked:  # every call agrees: the kernel itself is marked
                kernels[gv] = mod[gv].with_attr(LAYOUT_FREE, _indices(seen[0]))
            elif marked:
                copies += [(gv, p) for p in marked]
        mod = with_functions(mod, kernels)
        if copies:  # added by the block builder: a typed, unique GlobalVar each (``<kernel>_frozen``...)
            bb = relax.BlockBuilder(mod)
            for gv, pattern in copies:
                route[(gv, pattern)] = bb.add_func(mod[gv].with_attr(LAYOUT_FREE, _indices(pattern)),
                                                   f"{gv.name_hint}_frozen")
            mod = bb.get()
        if not route:
            return mod
        mod = _redirect(mod, route)
        entries = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function)]
        return relax.transform.DeadCodeElimination(entries)(mod)  # an original no call is left to


def _is_kernel_call(expr, mod) -> bool:
    return isinstance(expr, relax.Call) and expr.op.same_as(_CALL_TIR) and isinstance(expr.args[1], relax.Tuple) \
        and isinstance(mod[expr.args[0]], tvm.tirx.PrimFunc)


def _constant_flags(call) -> tuple[bool, ...]:
    """Per argument of a kernel call: whether it is a constant."""
    return tuple(isinstance(a, tvm.ir.GenericConst) for a in call.args[1].fields)


def _indices(flags) -> list[int]:
    return [i for i, c in enumerate(flags) if c]


def _redirect(mod: tvm.IRModule, route: dict) -> tvm.IRModule:
    """``mod`` with the kernel calls of ``route`` (``(kernel, constant pattern) -> kernel``)
    calling the kernel it names."""

    @mutator
    class _Redirect(PyExprMutator):
        def visit_call_(self, call):
            new = super().visit_call_(call)
            if _is_kernel_call(new, mod) and (new.args[0], _constant_flags(new)) in route:
                new = relax.Call(new.op, [route[(new.args[0], _constant_flags(new))], *new.args[1:]],
                                 new.attrs, new.ty_args)
            return new

    return with_functions(mod, {gv: _Redirect(mod).visit_expr(f) for gv, f in mod.functions.items()
                                if isinstance(f, relax.Function)})


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
