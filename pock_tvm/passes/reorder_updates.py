"""ReorderUpdates: each parameter's optimizer update runs as soon as its gradient exists."""

from __future__ import annotations

import tvm
from tvm import relax

from ..analysis.layers import bindings
from .utils import substitute, vars_in, with_functions


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.ReorderUpdates")
class ReorderUpdates:
    """Reads ``train_step`` (from ``AppendOptimizer``) and the adjoints it calls; rewrites
    ``train_step`` into one dataflow block with the adjoints inlined.

    Every optimizer binding then moves right after the last value it reads: the update of a
    parameter follows its gradient, so the gradient buffer dies at once instead of living until
    the end of the backward pass (TTE's operator reordering; the static memory planner reuses it).
    Optimizer bindings that read no gradient (bias-correction scalars, the step counter) move
    just before their first user. An update also waits for the backward ops that read the old
    value of its parameter, so that ``InPlaceUpdates`` can overwrite it. Only the order changes, never a value. The adjoint functions
    stay in the module (analysis reads them); lowering's dead-code elimination drops them.
    """

    def __init__(self, func_name: str = "train_step"):
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        step = mod[self.func_name]
        if not any(isinstance(b.value, relax.Call) and isinstance(b.value.op, relax.GlobalVar)
                   for b in bindings(step)):
            raise ValueError(f"ReorderUpdates: {self.func_name} calls no adjoint; run it right "
                             "after AppendOptimizer")
        bb = relax.BlockBuilder()
        params = [relax.Var(p.name, p.ty) for p in step.params]
        remap: dict = dict(zip(step.params, params))
        with bb.function(self.func_name, params, attrs=dict(step.attrs or {})):
            with bb.dataflow():
                own = _inline(bb, mod, bindings(step), remap, top=True)
                out = bb.emit_output(substitute(step.body.body, remap), "result")
            bb.emit_func_output(out)
        flat = bb.get()[self.func_name]
        new = _reorder(flat, own)
        return with_functions(mod, {mod.get_global_var(self.func_name): new})


def _inline(bb, mod, body, remap, top=False) -> set:
    """Emit ``body`` with calls of module functions inlined; returns the variables emitted for
    ``train_step``'s own (optimizer) bindings when ``top``."""
    own = set()
    for binding in body:
        value = binding.value
        if isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar):
            callee = mod[value.op.name_hint]
            inner = dict(zip(callee.params, [substitute(a, remap) for a in value.args]))
            _inline(bb, mod, bindings(callee), inner)
            remap[binding.var] = substitute(callee.body.body, inner)
            continue
        if isinstance(value, relax.Var):  # an alias (Gradient's `x_adjoint_out = x_adjoint`)
            remap[binding.var] = substitute(value, remap)
            continue
        if isinstance(value, relax.TupleGetItem):
            tup = substitute(value.tuple_value, remap)
            if isinstance(tup, relax.Tuple):  # item of an inlined return: no binding needed
                remap[binding.var] = tup.fields[value.index]
                continue
        new = bb.emit(substitute(value, remap), binding.var.name)
        remap[binding.var] = new
        if top:
            own.add(new)
    return own


def _reorder(func: relax.Function, own: set) -> relax.Function:
    """Move each binding of ``own`` right after its inputs (gradient-free ones before first use)."""
    (block,) = func.body.blocks
    bound = {b.var for b in block.bindings}
    deps = {b.var: vars_in(b.value) & bound for b in block.bindings}
    # an update that reads an old parameter also waits for every backward op reading it (the
    # input gradient reads the weight), so the old value is dead once the update has run
    param_readers: dict = {}
    for b in block.bindings:
        if b.var not in own:
            for v in vars_in(b.value) - bound:
                param_readers.setdefault(v, set()).add(b.var)
    for b in block.bindings:
        if b.var in own:
            for v in vars_in(b.value) - bound:
                deps[b.var] |= param_readers.get(v, set())
    optimizer = {b.var: b for b in block.bindings if b.var in own}
    readers: dict = {}
    reads_grad: dict = {}
    for b in block.bindings:
        if b.var not in own:
            continue
        for v in deps[b.var]:
            readers.setdefault(v, []).append(b)
        reads_grad[b.var] = any(v not in own or reads_grad[v] for v in deps[b.var])
    order, placed = [], set()

    def place(b) -> None:
        if b.var in placed:
            return
        for v in deps[b.var]:  # gradient-free inputs go right before their first user
            if v not in placed:
                place(optimizer[v])
        if b.var in placed:  # placing an input may already have woken this binding
            return
        placed.add(b.var)
        order.append(b)
        wake(b.var)

    def wake(var) -> None:
        for reader in readers.get(var, ()):
            if reader.var not in placed and reads_grad[reader.var] and all(
                    v in placed or not reads_grad.get(v, True) for v in deps[reader.var]):
                place(reader)

    for b in block.bindings:
        if b.var not in own:
            placed.add(b.var)
            order.append(b)
            wake(b.var)
    for b in block.bindings:
        if b.var not in placed:
            place(b)
    new_block = relax.DataflowBlock(order, block.span)
    body = relax.SeqExpr([new_block], func.body.body)
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
