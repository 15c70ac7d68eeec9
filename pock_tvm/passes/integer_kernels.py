"""IntegerKernels: convs and linear layers between dequantized int8 tensors run on the integers."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..quantization.int8 import constant, dequantize_args, is_integer
from .utils import with_functions

R = relax.op
ACCUMULATOR = "int32"


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.IntegerKernels")
class IntegerKernels:
    """For every Relax function of the module:

    - ``conv2d(dequantize(x, s_x, z_x), dequantize(w, s_w, 0, axis=0))`` becomes
      ``astype(conv2d(x - z_x, w, out_dtype="int32"), "float32") * (s_x * s_w)``, and a linear
      layer ``matmul(dequantize(x), permute_dims(dequantize(w, axis=0)))`` likewise: int8 inputs,
      int32 accumulation, one float rescale that fuses with what follows (bias, BatchNorm,
      activation, the next layer's quantize), so the kernel writes int8 again. Needs integer
      ``x`` and ``w``, a per-tensor constant ``s_x``, ``z_x``, constant ``s_w`` and a zero ``w``
      zero point; others are left as they are. A nonzero ``z_x`` (ONNX uint8 activations) widens
      both operands to int32.
    - Every other reader of a dequantized activation (the backward pass, a residual add) gets its
      own ``dequantize`` emitted just before it, so that what stays alive between the forward
      and the backward pass is the int8 tensor, not its float copy.

    The arithmetic is that of the graph it replaces, up to float rounding of the accumulation.
    Runs after autodiff (the gradient rules see the QDQ form) and before ``LegalizeOps``.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return with_functions(mod, {
            gvar: relax.analysis.remove_all_unused(_Rewriter(mod, relax.analysis.get_var2val(func)).visit_expr(func))
            for gvar, func in mod.functions.items() if isinstance(func, relax.Function) and _has_dequantize(func)})


def _has_dequantize(func) -> bool:
    found = []
    relax.analysis.post_order_visit(func.body, lambda e: found.append(1) if dequantize_args(e) else None)
    return bool(found)


def _zero(expr) -> bool:
    value = constant(expr)
    return value is not None and not np.any(value)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, var2val):
        super().__init__(mod)
        self.var2val = var2val

    def _dequantized(self, expr):
        """``(q, scale, zero_point, axis)`` if ``expr`` is a variable bound to a dequantize of an
        integer tensor, else None."""
        found = dequantize_args(self.var2val.get(expr)) if isinstance(expr, relax.Var) else None
        if found and is_integer(found[0].ty.dtype):
            return found
        return None

    def _activation(self, expr):
        found = self._dequantized(expr)
        if found is None or constant(found[1]) is None or constant(found[1]).size != 1 or constant(found[2]) is None:
            return None
        q, scale, zero_point, _ = found
        q = self.visit_expr(q)
        if not _zero(zero_point):
            q = self.builder_.emit(R.subtract(R.astype(q, ACCUMULATOR), R.astype(zero_point, ACCUMULATOR)), "x_int")
        return q, float(constant(scale).reshape(()))

    def _weight(self, expr):
        found = self._dequantized(expr)
        if found is None or found[3] != 0 or constant(found[1]) is None or not _zero(found[2]):
            return None
        return self.visit_expr(found[0]), constant(found[1]).astype(np.float32)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        name = getattr(getattr(value, "op", None), "name", "")
        new_value = None
        if name == "relax.nn.conv2d" and value.attrs.data_layout == "NCHW" and value.attrs.kernel_layout == "OIHW":
            new_value = self._conv2d(value)
        elif name == "relax.matmul":
            new_value = self._linear(value)
        if new_value is None:
            new_value = self._recompute_reads(value)
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(new_value, binding.var.name))

    def _operands(self, x, w):
        """``(x, w, s_x * s_w)`` on the integers, if ``x`` is a dequantized activation and ``w`` a
        dequantized weight (per output channel), else None."""
        x, w = self._activation(x), self._weight(w)
        if x is None or w is None:
            return None
        (qx, sx), (qw, sw) = x, w
        if qx.ty.dtype != qw.ty.dtype:
            qw = R.astype(qw, qx.ty.dtype)
        return qx, qw, (sx * sw).astype(np.float32)

    def _conv2d(self, call):
        found = self._operands(call.args[0], call.args[1])
        if found is None:
            return None
        qx, qw, scale = found
        a = call.attrs
        acc = self.builder_.emit(R.nn.conv2d(qx, qw, a.strides, a.padding, a.dilation, a.groups, a.data_layout,
                                             a.kernel_layout, a.out_layout, ACCUMULATOR), "acc")
        scale = scale.reshape(1, -1, 1, 1) if scale.size > 1 else scale.reshape(())
        return R.multiply(R.astype(acc, "float32"), relax.const(scale))

    def _linear(self, call):
        transposed = self.var2val.get(call.args[1]) if isinstance(call.args[1], relax.Var) else None
        if getattr(getattr(transposed, "op", None), "name", "") != "relax.permute_dims" or \
                [int(v) for v in transposed.attrs.axes] != [1, 0]:
            return None
        found = self._operands(call.args[0], transposed.args[0])
        if found is None:
            return None
        qx, qw, scale = found
        acc = self.builder_.emit(R.matmul(qx, R.permute_dims(qw, [1, 0]), out_dtype=ACCUMULATOR), "acc")
        return R.multiply(R.astype(acc, "float32"), relax.const(scale))

    def _recompute_reads(self, value):
        if not isinstance(value, relax.Call) or dequantize_args(value):
            return self.visit_expr(value)
        args = []
        for arg in value.args:
            found = self._dequantized(arg)
            if found is not None and not isinstance(found[0], tvm.ir.expr.Constant):
                q, scale, zero_point, axis = found
                arg = self.builder_.emit(R.dequantize(self.visit_expr(q), scale, zero_point, axis,
                                                      self.var2val[arg].attrs.out_dtype), "x_dq")
            else:
                arg = self.visit_expr(arg)
            args.append(arg)
        return relax.Call(value.op, args, value.attrs, value.ty_args, value.span)
