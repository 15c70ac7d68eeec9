"""SparseGradient: reverse-mode autodiff w.r.t. the updated parameters only."""

from __future__ import annotations

import tvm
from tvm import relax

from .gradient_rules import gradient_rules_installed
from ..analysis.layers import bindings
from .utils import substitute, vars_in, with_functions

TAIL = "__tail"
FORWARD_BINDINGS = "pock_tvm.num_forward_bindings"


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.SparseGradient")
class SparseGradient:
    """Reads ``loss`` and the names of its trainable parameters; creates ``loss_adjoint``.

    ``loss_adjoint`` has the parameters of ``loss`` and returns ``(loss, (grad_0, ...))`` in the
    order of ``trainable``. The bindings of ``loss`` that no trainable parameter reaches (the
    frozen prefix) are cut off first: ``loss_adjoint`` computes them as plain inference and
    passes the frontier to ``loss__tail_adjoint``, the Relax ``Gradient`` of the rest. So ops
    below the lowest updated layer need no gradient rule and get no backward op; Relax's own
    pruning then drops weight gradients of frozen weights, and a split weight
    (``SplitPartialChannels``) gets the gradient of its updated channels only. The attribute
    ``pock_tvm.num_forward_bindings`` of ``loss__tail_adjoint`` says where its backward starts.
    Requires ``AppendLoss``; run ``CheckGradientRules`` first for a readable error.
    """

    def __init__(self, trainable: list[str] | None = None, func_name: str = "loss"):
        self.trainable = list(trainable or [])
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with gradient_rules_installed():  # pock_tvm's rules, for this pass only
            return self._transform(mod, ctx)

    def _transform(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not self.trainable:
            raise ValueError("SparseGradient: the scheme updates no parameter; select at least one "
                             "(e.g. the preset 'bias-only' or a rule with mode 'full')")
        func = mod[self.func_name]
        params = {p.name: p for p in func.params}
        unknown = [n for n in self.trainable if n not in params]
        if unknown:
            raise ValueError(f"SparseGradient: {unknown} are not parameters of {self.func_name}")
        prefix, tail = _partition(func, set(self.trainable))
        tail_name = self.func_name + TAIL
        tail_func, frontier = _tail_function(func, prefix, tail)
        mod = with_functions(mod, {tail_name: tail_func})
        require = [p for p in tail_func.params if p.name in set(self.trainable)]
        require.sort(key=lambda p: self.trainable.index(p.name))
        mod = relax.transform.Gradient(tail_name, require_grads=require)(mod)
        # Gradient keeps the forward bindings first: record where the backward part starts
        adjoint = mod[tail_name + "_adjoint"].with_attr(FORWARD_BINDINGS, len(tail))
        adjoint = adjoint.without_attr("global_symbol")  # internal: DCE may drop it once inlined
        mod[mod.get_global_var(tail_name + "_adjoint")] = adjoint
        return _add_adjoint(mod, func, prefix, frontier, tail_name, self.func_name + "_adjoint")


def _partition(func: relax.Function, trainable: set[str]):
    """Bindings no trainable parameter reaches (prefix) and the rest (tail), in order."""
    reached = {p for p in func.params if p.name in trainable}
    prefix, tail = [], []
    for binding in bindings(func):
        if vars_in(binding.value) & reached:
            reached.add(binding.var)
            tail.append(binding)
        else:
            prefix.append(binding)
    return prefix, tail


def _emit(bb, binding, remap, output=False):
    value = substitute(binding.value, remap)
    new = (bb.emit_output if output else bb.emit)(value, binding.var.name)
    remap[binding.var] = new
    return new


def _tail_function(func, prefix, tail):
    """``loss__tail(frontier..., params read by the tail..., ) -> loss`` over the tail bindings."""
    read = set().union(*[vars_in(b.value) for b in tail])
    frontier = [b.var for b in prefix if b.var in read]
    # every parameter of loss stays a parameter (fixed signature); then the frontier
    originals = list(func.params) + frontier
    new_params = [relax.Var(v.name, v.ty) for v in originals]
    bb = relax.BlockBuilder()
    remap = dict(zip(originals, new_params))
    with bb.function("tail", new_params):
        with bb.dataflow():
            for i, binding in enumerate(tail):
                last = _emit(bb, binding, remap, output=i == len(tail) - 1)
        bb.emit_func_output(last)
    return bb.get()["tail"], frontier


def _add_adjoint(mod, func, prefix, frontier, tail_name, name) -> tvm.IRModule:
    """Add ``name``: the frozen prefix as inference, then a call of the tail's adjoint. The tail
    itself is dropped (only its adjoint is used)."""
    tail_adjoint_name = tail_name + "_adjoint"
    new_params = [relax.Var(p.name, p.ty) for p in func.params]
    # re-add the tail adjoint through the builder so that its GlobalVar carries a type
    others = {gv: f for gv, f in mod.functions.items()
              if gv.name_hint not in (tail_name, tail_adjoint_name)}
    bb = relax.BlockBuilder(tvm.IRModule(others, attrs=mod.attrs))
    adjoint_gv = bb.add_func(mod[tail_adjoint_name], tail_adjoint_name)
    remap = dict(zip(func.params, new_params))
    with bb.function(name, new_params):
        with bb.dataflow():
            for binding in prefix:
                _emit(bb, binding, remap)
            args = [*new_params, *[remap[v] for v in frontier]]
            out = bb.emit_output(relax.Call(adjoint_gv, args), "result")
        bb.emit_func_output(out)
    result = bb.get()
    gv = result.get_global_var(name)
    result[gv] = result[gv].without_attr("global_symbol")  # internal, like the tail adjoint
    return result
