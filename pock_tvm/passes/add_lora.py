"""AddLoRA: a trainable low-rank path beside chosen linear weights of ``forward``."""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from .utils import with_functions

R = relax.op


@dataclass(frozen=True)
class Adapter:
    """The Relax names of one weight's adapter matrices, its rank and its scale ``alpha / rank``."""

    a: str
    b: str
    rank: int
    scale: float


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.AddLoRA")
class AddLoRA:
    """Reads ``forward`` and ``adapters = {W: Adapter}`` (Relax parameter names); rewrites every
    linear layer ``x @ W.T`` on a listed ``W`` into ``x @ W.T + scale * (x @ A.T) @ B.T`` with
    ``A`` of shape ``(rank, in)`` and ``B`` of shape ``(out, rank)``, appended to the parameters in
    the order of ``adapters``. A listed weight read other than as ``permute_dims(W, [1, 0])`` into
    a matmul is an error. Runs before the scheme is resolved: adapters are parameters like any other.
    """

    def __init__(self, adapters: dict[str, Adapter], func_name: str = "forward"):
        self.adapters = dict(adapters)
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        func = mod[self.func_name]
        params = {p.name: p for p in func.params}
        missing = sorted(set(self.adapters) - set(params))
        if missing:
            raise ValueError(f"AddLoRA: {missing} are not parameters of {self.func_name}")
        pairs = {}
        for name, adapter in self.adapters.items():
            out_f, in_f = (int(d) for d in params[name].ty.shape)
            dtype = params[name].ty.dtype
            pairs[name] = (relax.Var(adapter.a, relax.TensorType((adapter.rank, in_f), dtype)),
                           relax.Var(adapter.b, relax.TensorType((out_f, adapter.rank), dtype)), adapter.scale)
        rewriter = _Rewriter(mod, pairs)
        body = rewriter.visit_expr(func.body)
        unused = sorted(set(pairs) - rewriter.done)
        if unused:
            raise ValueError(f"AddLoRA: {unused} feed no linear layer (x @ W.T); LoRA adapts nn.Linear weights, "
                             "select only those")
        new_params = list(func.params) + [v for a, b, _ in pairs.values() for v in (a, b)]
        new_func = relax.Function(new_params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
        return with_functions(mod, {self.func_name: new_func})


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, pairs):
        super().__init__(mod)
        self.pairs = pairs
        self.transposed: dict[relax.Var, str] = {}
        self.done: set[str] = set()

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        op = getattr(value, "op", None)
        name = getattr(op, "name", "")
        reads = [a.name for a in getattr(value, "args", []) if isinstance(a, relax.Var) and a.name in self.pairs]
        if name == "relax.permute_dims" and reads and [int(a) for a in value.attrs.axes] == [1, 0]:
            self.transposed[binding.var] = reads[0]
        elif reads:
            raise ValueError(f"AddLoRA: {name} reads {reads[0]} directly; LoRA adapts linear layers (x @ W.T)")
        if name == "relax.matmul" and value.args[1] in self.transposed:
            weight = self.transposed[value.args[1]]
            a, b, scale = self.pairs[weight]
            x = self.visit_expr(value.args[0])
            base = self.builder_.emit(R.matmul(x, self.visit_expr(value.args[1])), "lora_base")
            low = self.builder_.emit(R.matmul(x, R.permute_dims(a, [1, 0])), "lora_down")
            up = self.builder_.emit(R.matmul(low, R.permute_dims(b, [1, 0])), "lora_up")
            out = R.add(base, R.multiply(up, relax.const(scale, a.ty.dtype)))
            emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
            self.set_var_remap(binding.var, emit(out, binding.var.name))
            self.done.add(weight)
            return None
        return super().visit_var_binding_(binding)
