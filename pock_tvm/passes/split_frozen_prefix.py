"""SplitFrozenPrefix: the part of a step that depends only on the data becomes its own function.

When a scheme freezes a prefix of the model (last-2 of a 30-layer transformer), most of a step
recomputes activations that are the same every epoch. This pass cuts ``train_step`` into
``prefix`` (inputs -> the frozen activations the rest reads) and ``train_step_cached`` (those
activations instead of the inputs -> the same outputs as ``train_step``), so that ``fit`` can
compute the prefix once per sample and train from cached activations.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax

from .. import calling
from ..analysis.layers import bindings
from .utils import substitute, vars_in, with_functions

logger = logging.getLogger(__name__)

# The attribute of ``prefix`` that says why no prefix function was made (``train_step`` alone).
DECLINED_ATTR = "pock_tvm.prefix_declined"

# Ops that move or relabel data and cost less to redo in the step than to cache their result (a
# transpose or a broadcast of a cached tensor would otherwise be a second cached copy).
RECOMPUTED_OPS = frozenset({
    "relax.permute_dims", "relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten",
    "relax.astype", "relax.broadcast_to", "relax.repeat", "relax.tile", "relax.strided_slice",
    "relax.collapse_sum_to",
})


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.SplitFrozenPrefix")
class SplitFrozenPrefix:
    """Reads ``train_step`` (one dataflow block, the training graph after ``ReorderUpdates``,
    calling convention of :mod:`pock_tvm.calling`) and adds two functions; ``train_step`` stays.

    A binding belongs to the *prefix* when it reads a model input (the first ``num_inputs``
    parameters), directly or through other prefix bindings, and reads nothing that changes from
    step to step: no trainable parameter, target, ``lr``, ``step`` or optimizer state (frozen
    parameters passed at run time and constants may be read). The *cached* tensors are the prefix
    values that the rest of the step reads; a cached value made by a data-movement op
    (``RECOMPUTED_OPS``: transposes, reshapes, broadcasts) is recomputed in the step from its own
    inputs instead, so that no tensor is cached twice in two layouts.

    - ``prefix(*inputs, *params)`` returns the tuple of cached tensors;
    - ``train_step_cached(*cached, *params, target, lr, step, *states)`` returns what
      ``train_step`` returns, with the prefix bindings left out.

    Every cached tensor must be batch-major (its first axis a multiple of the batch, which is the
    first axis of the first input) so that it can be cached per sample. When nothing but the
    inputs themselves would be cached (the first op already reads a trainable tensor) or a cached
    tensor is not batch-major, the module is returned with ``train_step`` alone and the reason as
    the module attribute ``pock_tvm.prefix_declined``. The values are those of ``train_step``:
    the same bindings, split in two.
    """

    def __init__(self, num_inputs: int, func_name: str = calling.TRAIN_STEP):
        self.num_inputs = num_inputs
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        step = mod[self.func_name]
        if len(step.body.blocks) != 1:
            raise ValueError(f"SplitFrozenPrefix: {self.func_name} has {len(step.body.blocks)} blocks; run it "
                             "after ReorderUpdates (one dataflow block)")
        binds = bindings(step)
        inputs = list(step.params[:self.num_inputs])
        varying = _varying_params(step, self.num_inputs)
        kind = _classify(binds, inputs, varying)
        producer = {b.var: b for b in binds}
        cached = _cached(binds, step.body.body, kind, producer)
        reason = _decline_reason(cached, inputs, int(inputs[0].ty.shape[0]) if inputs else 0)
        if reason:
            logger.info("SplitFrozenPrefix: no prefix function: %s", reason)
            return _with_attr(mod, DECLINED_ATTR, reason)
        # forward's arguments: the inputs and every passed parameter (a trained one is unused)
        prefix_params = list(step.params[:len(step.params) - len(_tail(step))])
        prefix = _prefix_function(binds, kind, prefix_params, cached)
        cached_step = _cached_step(step, binds, kind, cached, self.num_inputs)
        logger.info("SplitFrozenPrefix: %d prefix bindings of %d, %d cached tensors",
                    sum(1 for k in kind.values() if k == _PREFIX), len(binds), len(cached))
        return with_functions(mod, {calling.PREFIX: prefix, calling.TRAIN_STEP_CACHED: cached_step})


_PREFIX, _CONST, _STEP = "prefix", "const", "step"


def _varying_params(step: relax.Function, num_inputs: int) -> set:
    """The parameters that change from step to step: trainable ones, target, lr, step, states."""
    attrs = step.attrs or {}
    if "pock_tvm.trainable" not in attrs:
        raise ValueError("SplitFrozenPrefix: train_step has no pock_tvm.trainable attribute; run it after "
                         "AppendOptimizer")
    trainable = {str(t) for t in attrs["pock_tvm.trainable"]}
    tail = _tail(step)
    middle = list(step.params[num_inputs:len(step.params) - len(tail)])
    return set(tail) | {p for p in middle if p.name in trainable}


def _tail(step: relax.Function) -> list:
    """``[target, lr, step, *states]``: the arguments after the passed parameters."""
    attrs = step.attrs
    states = len(attrs["pock_tvm.trainable"]) * len(attrs.get("pock_tvm.state_names", []))
    return list(step.params[len(step.params) - states - 3:])


def _classify(binds, inputs, varying) -> dict:
    """``{var: prefix | const | step}`` for every bound variable, in binding order."""
    kind = {v: _PREFIX for v in inputs}
    kind.update({v: _STEP for v in varying})
    for b in binds:
        reads = {kind.get(v, _CONST) for v in vars_in(b.value)}
        kind[b.var] = _STEP if _STEP in reads else _PREFIX if _PREFIX in reads else _CONST
    return kind


def _cached(binds, ret, kind, producer) -> list:
    """The prefix values the rest of the step reads, after moving data-movement ops to the step."""
    redo: set = set()
    while True:
        readers = [b.value for b in binds if kind[b.var] == _STEP or b.var in redo] + [ret]
        read = []
        for value in readers:
            for v in _ordered_vars(value):
                if kind.get(v) == _PREFIX and v not in redo and v not in read:
                    read.append(v)
        movable = [v for v in read if v in producer and _recomputed(producer[v], v)]
        if not movable:
            return read
        redo.update(movable)
        for v in movable:
            kind[v] = _STEP  # computed in the step from its own (cached) inputs


def _recomputed(binding, var) -> bool:
    value = binding.value
    if isinstance(value, (relax.TupleGetItem, relax.Var)):
        return True
    if not isinstance(var.ty, relax.TensorType):  # a tuple, a shape: cached as its parts
        return True
    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name in RECOMPUTED_OPS


def _ordered_vars(expr) -> list:
    found: list = []
    relax.analysis.post_order_visit(expr, lambda e: found.append(e) if isinstance(e, relax.Var) else None)
    return found


def _decline_reason(cached, inputs, batch: int) -> str:
    if not cached or all(v in inputs for v in cached):
        return "the first ops already read a trained tensor: the frozen prefix computes nothing to cache"
    for v in cached:
        ty = v.ty
        if not isinstance(ty, relax.TensorType) or ty.shape is None or not all(
                isinstance(d, tvm.tirx.IntImm) for d in ty.shape.values):
            return f"the cached value '{v.name}' ({ty}) is not a tensor of static shape"
        dims = [int(d) for d in ty.shape.values]
        if not dims or batch <= 0 or dims[0] % batch:
            return (f"the cached tensor '{v.name}' of shape {dims} is not batch-major (its first axis is not a "
                    f"multiple of the batch, {batch}): it cannot be cached per sample")
    return ""


def _emit(bb, binding, remap) -> None:
    value = substitute(binding.value, remap)
    if isinstance(binding, relax.MatchCast):
        remap[binding.var] = bb.match_cast(value, binding.struct_info, binding.var.name)
    else:
        remap[binding.var] = bb.emit(value, binding.var.name)


def _needed(binds, roots, allowed) -> set:
    """The bindings (of kinds ``allowed``) that the values ``roots`` depend on."""
    producer = {b.var: b for b in binds}
    need, todo = set(), list(roots)
    while todo:
        v = todo.pop()
        if v in need or v not in producer or v not in allowed:
            continue
        need.add(v)
        todo.extend(vars_in(producer[v].value))
    return need


def _prefix_function(binds, kind, params, cached) -> relax.Function:
    allowed = {v for v, k in kind.items() if k in (_PREFIX, _CONST)}
    need = _needed(binds, cached, allowed)
    new_params = [relax.Var(p.name, p.ty) for p in params]
    remap = dict(zip(params, new_params))
    bb = relax.BlockBuilder()
    with bb.function(calling.PREFIX, new_params, attrs={"global_symbol": calling.PREFIX}):
        with bb.dataflow():
            for b in binds:
                if b.var in need:
                    _emit(bb, b, remap)
            out = bb.emit_output(relax.Tuple([remap[v] for v in cached]), "cached")
        bb.emit_func_output(out)
    return bb.get()[calling.PREFIX]


def _cached_step(step, binds, kind, cached, num_inputs) -> relax.Function:
    cached_params = [relax.Var(f"{calling.CACHED}{i}", v.ty) for i, v in enumerate(cached)]
    rest = [relax.Var(p.name, p.ty) for p in step.params[num_inputs:]]
    remap = dict(zip(cached, cached_params))
    remap.update(zip(step.params[num_inputs:], rest))
    attrs = {k: v for k, v in (step.attrs or {}).items() if k != "global_symbol"}
    bb = relax.BlockBuilder()
    with bb.function(calling.TRAIN_STEP_CACHED, [*cached_params, *rest],
                     attrs={**attrs, "global_symbol": calling.TRAIN_STEP_CACHED}):
        with bb.dataflow():
            for b in binds:
                if kind[b.var] != _PREFIX and b.var not in remap:
                    _emit(bb, b, remap)
            out = bb.emit_output(substitute(step.body.body, remap), "result")
        bb.emit_func_output(out)
    return bb.get()[calling.TRAIN_STEP_CACHED]


def _with_attr(mod: tvm.IRModule, key: str, value) -> tvm.IRModule:
    new = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    return new.with_attr(key, value)
