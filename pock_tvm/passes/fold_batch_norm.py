"""FoldBatchNorm: a frozen BatchNorm after a frozen conv becomes part of the conv's weight."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..analysis.layers import bindings
from ..quantization.int8 import dequantize_args
from .utils import vars_in, with_functions

R = relax.op


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.FoldBatchNorm")
class FoldBatchNorm:
    """Reads ``forward`` after ``BindFrozenParams``; rewrites every ``conv2d -> batch_norm`` whose
    conv weight, BN scale and statistics are constants and whose conv output feeds only the BN:

        bn(conv(x, W)) = conv(x, W * s) + (beta - mean * s),   s = gamma / sqrt(var + eps)

    computed in numpy at compile time. The BN shift ``beta`` may stay a trainable variable (bias
    schemes): the rewrite keeps it as an add, so its gradient is unchanged. A BN whose scale is
    trained, or whose conv weight is trained, is left for ``FreezeBatchNorm``. Removes the BN's
    per-element arithmetic and the buffers it needs in training. Runs before ``FreezeBatchNorm``.

    An int8 weight, ``dequantize(q, scale, 0, axis=0)`` of constants, keeps its integers: ``s``
    multiplies its per-channel ``scale`` instead.
    """

    def __init__(self, func_name: str = "forward"):
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        func = mod[self.func_name]
        folds = _find_folds(func)
        if not folds:
            return mod
        body = _Folder(mod, folds).visit_expr(func.body)
        new_func = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
        return with_functions(mod, {self.func_name: new_func})


def _op(value) -> str:
    return value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else ""


def _find_folds(func: relax.Function) -> dict:
    """``{conv var: (W', shift-or-(beta var, mean*s)), bn var: conv var}`` for each foldable pair."""
    uses: dict[relax.Var, list] = {}
    for binding in bindings(func):
        for var in vars_in(binding.value):
            uses.setdefault(var, []).append(binding.value)
    for var in vars_in(func.body.body):
        uses.setdefault(var, []).append(None)
    convs = {b.var: b.value for b in bindings(func) if _op(b.value) == "relax.nn.conv2d"}
    values = {b.var: b.value for b in bindings(func)}
    folds = {}
    for binding in bindings(func):
        bn = binding.value
        if _op(bn) != "relax.nn.batch_norm" or bn.args[0] not in convs or int(bn.attrs.axis) != 1:
            continue
        conv_var = bn.args[0]
        conv = convs[conv_var]
        gamma, beta, mean, var = bn.args[1:]
        weight = _weight(conv.args[1], values)
        if weight is None or not all(isinstance(e, tvm.ir.expr.Constant) for e in (gamma, mean, var)):
            continue
        if str(conv.attrs.kernel_layout) != "OIHW" or str(conv.attrs.data_layout) != "NCHW":
            continue
        if len(uses.get(conv_var, [])) != 1 or not all(
                isinstance(u, relax.TupleGetItem) and u.index == 0 for u in uses.get(binding.var, [])):
            continue
        s = gamma.value.numpy() / np.sqrt(var.value.numpy() + float(bn.attrs.epsilon))
        if isinstance(weight, tuple):  # int8 weight: BN's scale joins the per-channel weight scale
            q, scale, zero_point = weight
            folded = (q, (np.broadcast_to(scale, s.shape) * s).astype(np.float32), zero_point)
        else:
            folded = (weight * s.reshape(-1, 1, 1, 1)).astype(weight.dtype)
        shift = (mean.value.numpy() * s).astype(np.float32)
        if isinstance(beta, tvm.ir.expr.Constant):
            shift = beta.value.numpy() - shift
            beta = None
        folds[conv_var] = (folded, beta, shift)
        folds[binding.var] = conv_var
    return folds


def _weight(arg, values):
    """A constant conv weight as an array, an int8 one (``dequantize(q, scale, 0, axis=0)`` of
    constants) as ``(q, scale, zero_point)``, anything else None."""
    if isinstance(arg, tvm.ir.expr.Constant):
        return arg.value.numpy()
    found = dequantize_args(values.get(arg)) if isinstance(arg, relax.Var) else None
    if found is None or found[3] != 0 or not all(isinstance(e, tvm.ir.expr.Constant) for e in found[:3]):
        return None
    if np.any(found[2].value.numpy()):
        return None
    return found[0], found[1].value.numpy(), found[2]


@mutator
class _Folder(PyExprMutator):
    def __init__(self, mod, folds):
        super().__init__(mod)
        self.folds = folds
        self.new_conv: dict[relax.Var, relax.Var] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var, value = binding.var, binding.value
        if var in self.folds and isinstance(self.folds[var], tuple):
            folded = self.folds[var][0]
            if isinstance(folded, tuple):
                q, scale, zero_point = folded
                weight = self.builder_.emit(R.dequantize(q, relax.const(scale), zero_point, 0, "float32"), "w_dq")
            else:
                weight = relax.const(folded)
            a = value.attrs
            conv = R.nn.conv2d(self.visit_expr(value.args[0]), weight, a.strides, a.padding,
                               a.dilation, a.groups, a.data_layout, a.kernel_layout, a.out_layout,
                               a.out_dtype or None)
            self.new_conv[var] = self.builder_.emit(conv, var.name)
            return None
        if var in self.folds:  # the batch_norm tuple itself: replaced at its item 0
            return None
        if isinstance(value, relax.TupleGetItem) and value.tuple_value in self.folds:
            conv_var = self.folds[value.tuple_value]
            _, beta, shift = self.folds[conv_var]
            channels = (1, shift.shape[0], 1, 1)
            if beta is None:
                bias = relax.const(shift.reshape(channels))
            else:
                moved = self.builder_.emit(R.subtract(self.visit_expr(beta), relax.const(shift)))
                bias = self.builder_.emit(R.reshape(moved, channels))
            emit = self.builder_.emit if isinstance(var, relax.DataflowVar) else self.builder_.emit_output
            self.set_var_remap(var, emit(R.add(self.new_conv[conv_var], bias), var.name))
            return None
        return super().visit_var_binding_(binding)
