"""UnbroadcastLinear: a linear layer on a 3-D input reads its weight, not a per-batch copy of it."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from .utils import with_functions

R = relax.op


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.UnbroadcastLinear")
class UnbroadcastLinear:
    """Reads ``func_name``; rewrites ``matmul(x, broadcast_to(Wt, (B, K, N)))`` where ``Wt`` is 2-D
    ``(K, N)`` into ``matmul(x, Wt)`` (Relax's matmul broadcasts), then removes the dead copy.

    torch.export writes ``nn.Linear`` on a ``(batch, sequence, features)`` input as a batched
    matmul over an expanded weight (transformers' attention output projection): that copies the
    weight once per batch row in the forward pass, sums the copies back in the backward pass, and
    hides the layer from schemes (the weight's first use is not a matmul). Runs at import.
    """

    def __init__(self, func_name: str = "forward"):
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if self.func_name not in [gv.name_hint for gv in mod.get_global_vars()]:
            raise ValueError(f"UnbroadcastLinear: the module has no function '{self.func_name}'")
        func = _Unbroadcast(mod).visit_expr(mod[self.func_name])
        return with_functions(mod, {self.func_name: relax.analysis.remove_all_unused(func)})


@mutator
class _Unbroadcast(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") != "relax.matmul" or not isinstance(call.args[1], relax.Var):
            return call
        copied = self.lookup_binding(call.args[1])
        if not (isinstance(copied, relax.Call) and getattr(copied.op, "name", "") == "relax.broadcast_to"):
            return call
        weight = copied.args[0]
        w_shape = [int(d) for d in weight.ty.shape]
        out_shape = [int(d) for d in copied.ty.shape]
        x_shape = [int(d) for d in call.args[0].ty.shape]
        # only a copy per batch row of x: the result keeps x's batch shape either way
        if len(w_shape) != 2 or out_shape[-2:] != w_shape or out_shape[:-2] != x_shape[:-2]:
            return call
        return R.matmul(call.args[0], weight, call.attrs.out_dtype or None)
