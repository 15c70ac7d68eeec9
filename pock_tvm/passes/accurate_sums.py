"""AccurateSums: long float32 sums of a training graph accumulate in float64."""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .utils import with_functions

R = relax.op

# Sums over at least this many terms accumulate in float64 (the bias and BatchNorm gradients of a
# conv over 56x56 maps at batch 1 sum 3136 terms; a float32 accumulator then loses about
# n x 6e-8 of the terms' magnitude, against which a gradient that cancels out is small)
MIN_TERMS = 1024
_SUMS = ("relax.sum", "relax.mean", "relax.collapse_sum_to")


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.AccurateSums")
class AccurateSums:
    """Reads every Relax function; rewrites each float32 ``sum``, ``mean`` and ``collapse_sum_to``
    that reduces at least ``min_terms`` elements into each output into
    ``astype(op(astype(x, "float64")), "float32")``. Nothing else changes.

    A bias gradient is the sum of the output gradient over batch and map (50176 terms per channel
    for a conv at 224x224), and in a deep net those terms mostly cancel: accumulated in float32,
    one after the other, the rounding error is a visible fraction of the result (VGG-19's first
    bias gradients were 1e-3 to 1e-2 off float64, where PyTorch's pairwise sums stay within 3e-6).
    In float64 the sum is exact to float32's precision. ``FuseOps`` puts both casts inside the
    reduction kernel, so no float64 tensor is stored; the kernel reads the same bytes.
    """

    def __init__(self, min_terms: int | None = None):
        self.min_terms = MIN_TERMS if min_terms is None else min_terms

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mutator_ = _Accurate(mod, self.min_terms)
        updates = {}
        for gvar, func in mod.functions.items():
            if isinstance(func, relax.Function):
                new = mutator_.visit_expr(func)
                if not new.same_as(func):
                    updates[gvar] = new
        return with_functions(mod, updates)


def terms_per_output(call: relax.Call) -> int | None:
    """How many input elements each output element of a sum-like ``call`` adds (None: not static)."""
    x_shape, out_shape = call.args[0].ty.shape, call.ty.shape
    if x_shape is None or out_shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in [*x_shape, *out_shape]):
        return None
    total_in = math.prod(int(d) for d in x_shape)
    total_out = math.prod(int(d) for d in out_shape)
    return total_in // max(total_out, 1)


@mutator
class _Accurate(PyExprMutator):
    def __init__(self, mod, min_terms: int):
        super().__init__(mod)
        self.min_terms = min_terms

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        name = getattr(call.op, "name", "")
        if name not in _SUMS or getattr(call.args[0].ty, "dtype", None) != "float32" \
                or (terms_per_output(call) or 0) < self.min_terms:
            return call
        wide = R.astype(call.args[0], "float64")
        if name == "relax.collapse_sum_to":
            reduced = R.collapse_sum_to(wide, call.args[1])
        else:
            reduced = getattr(R, name.rpartition(".")[2])(wide, call.attrs.axis, call.attrs.keepdims)
        return R.astype(reduced, "float32")
