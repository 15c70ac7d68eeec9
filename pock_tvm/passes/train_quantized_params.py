"""TrainQuantizedParams: quantized parameters that are trained become float32 masters in integer units."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..quantization.int8 import along_expr, constant, dequantize_args, is_integer
from .utils import with_functions

R = relax.op


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.TrainQuantizedParams")
class TrainQuantizedParams:
    """Reads ``forward`` and ``names`` (Relax parameters of an integer dtype, each read only through
    ``relax.dequantize``). Each becomes a float32 parameter of the same name and shape holding the
    same integer values, and ``dequantize(q, s, z, axis)`` on it becomes ``(q - z) * s`` (``q * s``
    when ``z`` is 0): the arithmetic is unchanged, but an update can move ``q`` by less than one
    step. Gradients then arrive in integer units; the optimizer's ``qas`` scales them back.
    A conv2d weight with a per-output-channel scale (axis 0, NCHW/OIHW) is read as
    ``conv2d(x, q - z) * s``: the scale moves after the conv, where it is exact too, so no float
    copy of the weight is made, forward or backward.
    Listing a float parameter, or reading a listed one other than by ``dequantize``, is an error.
    """

    def __init__(self, names, func_name: str = "forward"):
        self.names = list(names)
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        func = mod[self.func_name]
        by_name = {p.name: p for p in func.params}
        unknown = [n for n in self.names if n not in by_name]
        floats = [n for n in self.names if n in by_name and not is_integer(by_name[n].ty.dtype)]
        if unknown or floats:
            raise ValueError(f"TrainQuantizedParams: {unknown + floats} are not integer parameters of "
                             f"{self.func_name}; list only quantized weights that the scheme trains")
        rewriter = _Rewriter(mod, relax.analysis.get_var2val(func))
        params = []
        for p in func.params:
            if p.name in self.names:
                new = relax.Var(p.name, relax.TensorType(p.ty.shape, "float32"))
                rewriter.set_var_remap(p, new)
                rewriter.masters.add(new)
                params.append(new)
            else:
                params.append(p)
        body = rewriter.visit_expr(func.body)
        new_func = relax.analysis.remove_all_unused(
            relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span))
        return with_functions(mod, {self.func_name: new_func})


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, var2val):
        super().__init__(mod)
        self.masters: set[relax.Var] = set()
        self.var2val = var2val

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        weight = value.args[1] if getattr(getattr(value, "op", None), "name", "") == "relax.nn.conv2d" else None
        found = dequantize_args(self.var2val.get(weight)) if isinstance(weight, relax.Var) else None
        a = value.attrs if weight is not None else None
        if found is None or found[3] != 0 or a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or \
                self.visit_expr(found[0]) not in self.masters or constant(found[1]) is None:
            return super().visit_var_binding_(binding)
        q, scale, zero_point, _ = found
        q = self._shifted(self.visit_expr(q), zero_point, 0)
        conv = self.builder_.emit(R.nn.conv2d(self.visit_expr(value.args[0]), q, a.strides, a.padding, a.dilation,
                                              a.groups, a.data_layout, a.kernel_layout, a.out_layout, a.out_dtype),
                                  "conv_q")
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(R.multiply(conv, along_expr(scale, 1, 4)), binding.var.name))
        return None

    def _shifted(self, q, zero_point, axis):
        zero = constant(zero_point)
        if zero is None or np.any(zero != 0):
            return R.subtract(q, R.astype(along_expr(zero_point, axis, len(q.ty.shape)), "float32"))
        return q

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        args = [self.visit_expr(a) for a in call.args]
        reads = [a for a in args if isinstance(a, relax.Var) and a in self.masters]
        if not reads:
            return super().visit_call_(call)
        found = dequantize_args(call)
        if found is None or args[0] not in self.masters:
            raise ValueError(f"TrainQuantizedParams: {reads[0].name} is read by {getattr(call.op, 'name', call.op)}, "
                             "not by relax.dequantize; it cannot be trained as a float master")
        q, scale, zero_point, axis = args[0], args[1], args[2], found[3]
        return R.multiply(self._shifted(q, zero_point, axis), along_expr(scale, axis, len(q.ty.shape)))
