"""SplitPartialChannels: give a partially updated weight its own tensor and its own op."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from .utils import with_functions

R = relax.op
UPDATED, FROZEN = "__upd", "__frz"


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.SplitPartialChannels")
class SplitPartialChannels:
    """Reads ``forward`` and ``partial = {param: (axis, k)}``; rewrites each listed weight.

    A weight ``W`` with ``k`` of its channels updated becomes two parameters, ``W__upd`` (the first
    ``k`` channels) and ``W__frz`` (the rest), in place of ``W`` in the signature. Its consumer is
    split the same way, so autodiff computes the weight gradient of the ``k`` channels only and
    only the matching ``k`` channels of the layer input stay alive for the backward pass:

    - conv2d (axis 1, input channels): ``conv(x[:, :k], W__upd) + conv(x[:, k:], W__frz)``
    - depthwise conv2d (axis 0): ``concat(dwconv(x[:, :k], W__upd), dwconv(x[:, k:], W__frz))``
    - linear ``x @ W.T`` (axis 1): ``x[..., :k] @ W__upd.T + x[..., k:] @ W__frz.T``

    A weight read as ``multiply(W, scale)`` with a constant per-channel ``scale`` (an int8 model's
    weight trained in integer units, ``TrainQuantizedParams``) is split the same way, each half
    with its own part of ``scale``.

    Sets the function attribute ``pock_tvm.partial`` to ``{param: [axis, k]}``. Runs first,
    before ``BindFrozenParams`` (which binds the ``W__frz`` halves) and ``AppendLoss``.
    """

    def __init__(self, partial: dict[str, tuple[int, int]] | None = None, func_name: str = "forward"):
        self.partial = dict(partial or {})
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not self.partial:
            return mod
        func = mod[self.func_name]
        names = {p.name for p in func.params}
        missing = sorted(set(self.partial) - names)
        if missing:
            raise ValueError(f"SplitPartialChannels: {missing} are not parameters of {self.func_name}")
        new_params, halves = [], {}
        for p in func.params:
            if p.name not in self.partial:
                new_params.append(p)
                continue
            axis, k = self.partial[p.name]
            shape = [int(d) for d in p.ty.shape]
            up, fr = list(shape), list(shape)
            up[axis], fr[axis] = k, shape[axis] - k
            pair = (relax.Var(p.name + UPDATED, relax.TensorType(up, p.ty.dtype)),
                    relax.Var(p.name + FROZEN, relax.TensorType(fr, p.ty.dtype)))
            halves[p.name] = pair
            new_params += pair
        body = _Splitter(mod, halves, self.partial).visit_expr(func.body)
        attrs = {"pock_tvm.partial": {n: [a, k] for n, (a, k) in self.partial.items()}}
        new_func = relax.Function(new_params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
        for key, value in attrs.items():
            new_func = new_func.with_attr(key, value)
        return with_functions(mod, {self.func_name: new_func})


@mutator
class _Splitter(PyExprMutator):
    def __init__(self, mod, halves, partial):
        super().__init__(mod)
        self.halves = halves
        self.partial = partial
        self.transposed: dict[str, str] = {}  # permute_dims(W) var -> W
        self.scaled: dict[str, tuple[str, object]] = {}  # multiply(W, scale) var -> (W, scale)

    def _split_param(self, arg):
        return isinstance(arg, relax.Var) and (arg.name in self.halves or arg.name in self.scaled)

    def _weights(self, name: str):
        """The two halves of weight ``name`` (a parameter or a scaled one), as the op reads them."""
        if name not in self.scaled:
            return self.halves[name], name
        base, scale = self.scaled[name]
        axis, k = self.partial[base]
        value = scale.value.numpy()
        parts = [value, value]
        if value.ndim and value.shape[axis] > 1:
            parts = [value.take(range(0, k), axis), value.take(range(k, value.shape[axis]), axis)]
        up, fr = self.halves[base]
        return (R.multiply(up, relax.const(parts[0])), R.multiply(fr, relax.const(parts[1]))), base

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        op = getattr(value, "op", None)
        op_name = getattr(op, "name", "")
        if not isinstance(value, relax.Call) or not any(self._split_param(a) or
                                                        getattr(a, "name", None) in self.transposed
                                                        for a in value.args):
            return super().visit_var_binding_(binding)
        if op_name == "relax.multiply" and self._split_param(value.args[0]) and \
                value.args[0].name in self.halves and isinstance(value.args[1], tvm.ir.expr.Constant):
            self.scaled[binding.var.name] = (value.args[0].name, value.args[1])
            return None  # re-emitted per half at the conv or matmul
        if op_name == "relax.permute_dims" and self._split_param(value.args[0]):
            self.transposed[binding.var.name] = value.args[0].name
            return None  # re-emitted per half at the matmul
        if op_name == "relax.nn.conv2d" and self._split_param(value.args[1]):
            out = self._conv(value, value.args[1].name)
        elif op_name == "relax.matmul" and getattr(value.args[1], "name", None) in self.transposed:
            out = self._linear(value, self.transposed[value.args[1].name])
        else:
            used = [getattr(a, "name", "?") for a in value.args]
            raise ValueError(
                f"SplitPartialChannels: {op_name} reads a partially updated weight ({used}); only "
                "conv2d and linear weights can be updated partially, set this one to full or frozen"
            )
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(out, binding.var.name))
        return None

    def _conv(self, call: relax.Call, name: str) -> relax.Expr:
        (w_up, w_fr), name = self._weights(name)
        axis, k = self.partial[name]
        x = self.visit_expr(call.args[0])
        a = call.attrs
        parts = self.builder_.emit(R.split(x, [k], axis=1), "x_split")
        xa = self.builder_.emit(relax.TupleGetItem(parts, 0), "x_upd")
        xb = self.builder_.emit(relax.TupleGetItem(parts, 1), "x_frz")
        channels = int(call.args[0].ty.shape[1])

        def conv(inp, w, groups):
            return R.nn.conv2d(inp, w, a.strides, a.padding, a.dilation, groups, a.data_layout,
                               a.kernel_layout, a.out_layout, a.out_dtype or None)

        if axis == 0:  # depthwise: split output channels together with input channels
            ya = self.builder_.emit(conv(xa, w_up, k))
            yb = self.builder_.emit(conv(xb, w_fr, channels - k))
            return R.concat([ya, yb], axis=1)
        ya = self.builder_.emit(conv(xa, w_up, int(a.groups)))
        yb = self.builder_.emit(conv(xb, w_fr, int(a.groups)))
        return R.add(ya, yb)

    def _linear(self, call: relax.Call, name: str) -> relax.Expr:
        (w_up, w_fr), name = self._weights(name)
        _, k = self.partial[name]
        x = self.visit_expr(call.args[0])
        last = len(call.args[0].ty.shape) - 1
        parts = self.builder_.emit(R.split(x, [k], axis=last), "x_split")
        xa = self.builder_.emit(relax.TupleGetItem(parts, 0), "x_upd")
        xb = self.builder_.emit(relax.TupleGetItem(parts, 1), "x_frz")
        out_dtype = call.attrs.out_dtype or None
        ya = self.builder_.emit(R.matmul(xa, R.permute_dims(w_up, [1, 0]), out_dtype))
        yb = self.builder_.emit(R.matmul(xb, R.permute_dims(w_fr, [1, 0]), out_dtype))
        return R.add(ya, yb)
