"""QuantizeForward: the int8 form of ``forward``, as the ONNX QDQ importer writes a quantized model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..quantization.int8 import ACTIVATION_DTYPE, WEIGHT_DTYPE, constant, dequantize_args, param_units
from .utils import with_functions

R = relax.op


@dataclass(frozen=True)
class OpScales:
    """Scales of one quantized conv or linear layer: ``activation`` of its input (per tensor,
    symmetric) and ``weight`` per output channel (symmetric)."""

    activation: float
    weight: np.ndarray


def quantizable_ops(func: relax.Function) -> dict[str, relax.Var]:
    """``{weight parameter name: input variable}`` of every ``conv2d(x, W)`` and linear layer
    (``matmul(x, permute_dims(W, [1, 0]))``) of ``func`` whose weight ``W`` is a parameter, or a
    parameter read through ``dequantize`` (an int8 weight)."""
    weights = {p: p for p in func.params}
    transposed, found = {}, {}
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            name = getattr(getattr(value, "op", None), "name", "")
            if name == "relax.dequantize" and value.args[0] in weights:
                weights[binding.var] = weights[value.args[0]]
            elif name == "relax.permute_dims" and value.args[0] in weights and \
                    [int(a) for a in value.attrs.axes] == [1, 0]:
                transposed[binding.var] = weights[value.args[0]]
            elif name == "relax.nn.conv2d" and value.args[1] in weights:
                found[weights[value.args[1]].name] = value.args[0]
            elif name == "relax.matmul" and value.args[1] in transposed:
                found[transposed[value.args[1]].name] = value.args[0]
    return found


def read_scales(func: relax.Function) -> dict[str, OpScales]:
    """The inverse of the pass: ``{weight parameter name: OpScales}`` of every layer of ``func``
    whose input is fake-quantized per tensor and whose weight parameter is read through a per-channel
    ``dequantize`` (zero points 0), as :class:`QuantizeForward` writes them."""
    values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    found = {}
    for w_name, x in quantizable_ops(func).items():
        fake = dequantize_args(values.get(x))
        if fake is None or not isinstance(fake[0], relax.Var):
            continue
        source = values.get(fake[0])
        if getattr(getattr(source, "op", None), "name", "") != "relax.quantize":
            continue
        found[w_name] = OpScales(float(constant(fake[1]).reshape(())), None)
    for w_name, (scale, _, _) in param_units(func).items():
        if w_name in found:
            found[w_name] = OpScales(found[w_name].activation, scale.reshape(-1))
    return {k: v for k, v in found.items() if v.weight is not None}


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.QuantizeForward")
class QuantizeForward:
    """Reads ``forward`` and ``scales = {W: OpScales}`` (Relax parameter names, see
    :func:`quantizable_ops`). For every listed conv or linear layer:

    - its input ``x`` becomes ``dequantize(quantize(x, s_x, 0), s_x, 0)`` (int8 fake quantization),
      for every reader of ``x`` (a residual add reads the same int8 tensor as the next conv, as
      in an int8 runtime; one quantization per tensor);
    - its weight parameter ``W`` becomes an int8 parameter of the same name and shape, read as
      ``dequantize(W, s_w, 0, axis=0)``.

    The parameters' values are the caller's (``pock_tvm.quantization.post_training`` rounds them). A listed weight
    read by any other op is an error: its float value would be gone.
    """

    def __init__(self, scales: dict[str, OpScales], func_name: str = "forward"):
        self.scales = dict(scales)
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        func = mod[self.func_name]
        ops = quantizable_ops(func)
        missing = sorted(set(self.scales) - set(ops))
        if missing:
            raise ValueError(f"QuantizeForward: {missing} are not weights of a conv2d or linear layer of "
                             f"{self.func_name}; quantize only those (pock_tvm.passes.quantize_forward.quantizable_ops)")
        inputs = quantizable_ops(func)
        rewriter = _Rewriter(mod, self.scales, {inputs[w]: s.activation for w, s in self.scales.items()},
                             func.params)
        params = []
        for p in func.params:
            if p.name in self.scales:
                new = relax.Var(p.name, relax.TensorType(p.ty.shape, WEIGHT_DTYPE))
                rewriter.set_var_remap(p, new)
                rewriter.int_weights[new] = self.scales[p.name]
                params.append(new)
            else:
                params.append(p)
        body = rewriter.visit_expr(func.body)
        new_func = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
        return with_functions(mod, {self.func_name: new_func})


def _weight(var: relax.Var, scales: OpScales) -> relax.Expr:
    return R.dequantize(var, relax.const(np.asarray(scales.weight, "float32")), relax.const(0, WEIGHT_DTYPE),
                        axis=0, out_dtype="float32")


def _fake_quant(x: relax.Expr, scale: float) -> relax.Expr:
    s, zero = relax.const(scale, "float32"), relax.const(0, ACTIVATION_DTYPE)
    return R.dequantize(R.quantize(x, s, zero, axis=-1, out_dtype=ACTIVATION_DTYPE), s, zero, axis=-1,
                        out_dtype="float32")


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, scales, activations: dict, inputs):
        super().__init__(mod)
        self.inputs = set(inputs)
        self.scales = scales
        self.activations = activations  # {input var: scale}: quantized once, where it is made
        self.int_weights: dict[relax.Var, OpScales] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        for arg in getattr(binding.value, "args", []):  # a function input: quantized before its first reader
            if arg in self.activations and arg in self.inputs:
                self.set_var_remap(arg, self.builder_.emit(_fake_quant(arg, self.activations.pop(arg)), "x_q"))
        self._rewrite(binding)
        if binding.var in self.activations:
            made = self.visit_expr(binding.var)
            self.set_var_remap(binding.var, self.builder_.emit(_fake_quant(made, self.activations[binding.var]), "x_q"))

    def _rewrite(self, binding: relax.VarBinding) -> None:
        value = binding.value
        name = getattr(getattr(value, "op", None), "name", "")
        args = [self.visit_expr(a) for a in getattr(value, "args", [])]
        weights = [a for a in args if isinstance(a, relax.Var) and a in self.int_weights]
        if not weights:
            super().visit_var_binding_(binding)
            return
        w = weights[0]
        scales = self.int_weights[w]
        if name == "relax.permute_dims" and args[0] is w:
            self._bind(binding, R.permute_dims(self.builder_.emit(_weight(w, scales), "w_dq"), value.attrs.axes))
            return
        if name == "relax.nn.conv2d" and args[1] is w:
            a = value.attrs
            self._bind(binding, R.nn.conv2d(args[0], self.builder_.emit(_weight(w, scales), "w_dq"), a.strides,
                                            a.padding, a.dilation, a.groups, a.data_layout, a.kernel_layout,
                                            a.out_layout, a.out_dtype))
            return
        raise ValueError(f"QuantizeForward: weight {w.name} is read by {name or type(value).__name__}, not as a "
                         "conv2d weight or a linear layer's permute_dims; leave it out of the quantized weights")

    def _bind(self, binding, value) -> relax.Var:
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        new = emit(value, binding.var.name)
        self.set_var_remap(binding.var, new)
        return new
