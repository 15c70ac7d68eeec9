"""InPlaceUpdates: new parameter and optimizer-state values are written over the old ones."""

from __future__ import annotations

import logging

import tvm
from tvm import relax

from .. import calling
from .utils import vars_in, with_functions

logger = logging.getLogger(__name__)

_ALLOC = "relax.builtin.alloc_tensor"
# kElemWise, kBroadcast, kOutEWiseFusable (an elementwise epilogue on a matmul/conv result): each
# output element is written from the same element of a same-shaped input. Not kInjective (2):
# transposes and slices read other elements.
_SAFE_PATTERNS = {0, 1, 4}


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.InPlaceUpdates")
class InPlaceUpdates:
    """Reads ``train_step`` (and ``train_step_cached``, when the step has a frozen-prefix function;
    ``func_names``) after ``CallTIRRewrite`` (kernels called with explicit output tensors); makes
    the output of an update kernel the input tensor it replaces.

    For each returned new value of a trainable parameter, of ``step`` or of an optimizer state
    (``pock_tvm.trainable`` / ``pock_tvm.state_names`` attributes), if the kernel producing it
    reads the old value as a direct input of the same shape and dtype, nothing reads the old value
    after that kernel, and the kernel writes each output element from the same element of that
    input (fused pattern up to an elementwise epilogue), the output allocation is replaced by the
    old tensor. The runtime then gets its own tensor back: no per-step allocation or copy of
    parameters and state. Runs after ``CallTIRRewrite`` and before ``StaticPlanBlockMemory``.
    """

    def __init__(self, func_names: tuple[str, ...] = (calling.TRAIN_STEP, calling.TRAIN_STEP_CACHED)):
        self.func_names = (func_names,) if isinstance(func_names, str) else tuple(func_names)

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        present = {g.name_hint for g in mod.get_global_vars()}
        for name in self.func_names:  # train_step_cached exists only with a frozen-prefix function
            if name in present:
                mod = _in_place(mod, name)
        return mod


def _in_place(mod: tvm.IRModule, func_name: str) -> tvm.IRModule:
    func = mod[func_name]
    if func.attrs is None or "pock_tvm.trainable" not in func.attrs:
        return mod
    old_of_output = _old_values(func)
    params = {p.name: p for p in func.params}
    (block,) = func.body.blocks
    binds = list(block.bindings)
    last_use: dict = {}
    for i, b in enumerate(binds):
        for v in vars_in(b.value):
            last_use[v] = i
    alias_of = {b.var: b.value for b in binds if isinstance(b.value, relax.Var)}
    returned = {}
    for index, var in enumerate(_output_vars(func, binds)):
        if index in old_of_output:
            returned[alias_of.get(var, var)] = params[old_of_output[index]]
    replace: dict = {}
    for i, b in enumerate(binds):
        call = b.value
        if not (isinstance(call, relax.Call) and isinstance(call.op, relax.GlobalVar)):
            continue
        prim = mod[call.op]
        pattern = int(prim.attrs.get("op_pattern", -1)) if prim.attrs else -1
        if not isinstance(prim, tvm.tirx.PrimFunc) or pattern not in _SAFE_PATTERNS:
            continue
        for out in call.args:
            old = returned.get(out)
            if old is None or old not in call.args or last_use.get(old, -1) > i:
                continue
            if not _same_tensor_type(old.ty, out.ty):
                continue
            replace[out] = old
    if not replace:
        return mod
    new_binds = [relax.VarBinding(b.var, replace[b.var]) if b.var in replace else b for b in binds]
    body = relax.SeqExpr([relax.BindingBlock(new_binds, block.span)], func.body.body)
    new = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
    logger.info("InPlaceUpdates: %d of %d updated tensors written in place", len(replace), len(returned))
    return with_functions(mod, {mod.get_global_var(func_name): new.with_attr("pock_tvm.in_place", len(replace))})


def _same_tensor_type(a, b) -> bool:
    return (isinstance(a, relax.TensorType) and isinstance(b, relax.TensorType) and a.dtype == b.dtype
            and [int(d) for d in a.shape] == [int(d) for d in b.shape])


def _old_values(func) -> dict[int, str]:
    """Output position -> name of the parameter it replaces (``calling.train_step_outputs``)."""
    trainable = list(func.attrs["pock_tvm.trainable"])
    states = calling.state_keys(trainable, list(func.attrs["pock_tvm.state_names"]))
    names = calling.train_step_outputs(trainable, states)
    return {i: name for i, name in enumerate(names) if name != calling.LOSS}


def _output_vars(func, binds) -> list:
    ret = func.body.body
    value = {b.var: b.value for b in binds}.get(ret, ret)
    return list(value.fields) if isinstance(value, relax.Tuple) else []
