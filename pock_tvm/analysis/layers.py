"""Which op consumes each parameter of ``forward``: the basis of schemes and channel slicing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

_VIEW_OPS = {"relax.reshape", "relax.permute_dims", "relax.astype", "relax.dequantize"}  # dequantize: int8 weights


@dataclass(frozen=True)
class ParamUse:
    """The first non-view op that reads a parameter, and what kind of layer that makes it."""

    kind: str  # conv | depthwise | linear | embedding | norm (a scale) | norm_bias (a shift) | bias | stat | other
    op: str
    position: int  # index of the binding, gives forward order


def _call_op(value) -> str | None:
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
        return value.op.name
    return None


def bindings(func: relax.Function) -> list[relax.VarBinding]:
    return [b for block in func.body.blocks for b in block.bindings]


def _kind(op: str, call: relax.Call, arg_index: int, value_ndim: int) -> str:
    if op == "relax.nn.conv2d" and arg_index == 1:
        groups = int(call.attrs.groups)
        return "depthwise" if groups > 1 and groups == int(call.ty.shape[1]) else "conv"
    if op == "relax.matmul" and arg_index == 1:
        return "linear"
    if op in ("relax.nn.batch_norm", "relax.nn.layer_norm", "relax.nn.group_norm", "relax.nn.rms_norm"):
        if arg_index == 1:
            return "norm"
        if arg_index == 2 and op != "relax.nn.rms_norm":
            return "norm_bias"  # the shift (beta) of a normalization
    if op == "relax.nn.batch_norm":
        return "stat"
    if op == "relax.multiply" and value_ndim == 1:  # RMSNorm / LayerNorm decomposed by torch.export
        return "norm"
    if op == "relax.take" and arg_index == 0:
        return "embedding"
    if op == "relax.add" and value_ndim == 1:
        return "bias"
    return "other"


def _reads(func: relax.Function, roots: list[str]):
    """``(position, op, call, arg_index, root)`` for every read of one of ``roots`` (names of
    ``func``'s parameters) by an op that is not a view; views (reshape, permute, astype, dequantize) are looked
    through, so a read of a reshaped root is a read of the root."""
    alias = {name: name for name in roots}
    for pos, binding in enumerate(bindings(func)):
        value = binding.value
        op = _call_op(value)
        if op is None:
            continue
        for index, arg in enumerate(value.args):
            if not isinstance(arg, relax.Var) or arg.name not in alias:
                continue
            if op in _VIEW_OPS and index == 0:
                alias[binding.var.name] = alias[arg.name]
                continue
            yield pos, op, value, index, alias[arg.name]


def param_uses(func: relax.Function) -> dict[str, ParamUse]:
    """Map each parameter name of ``func`` to its first real use (views are looked through)."""
    ndim = {p.name: len(p.ty.shape) for p in func.params if hasattr(p.ty, "shape")}
    uses: dict[str, ParamUse] = {}
    for pos, op, call, index, root in _reads(func, [p.name for p in func.params]):
        if root not in uses:
            uses[root] = ParamUse(_kind(op, call, index, ndim.get(root, 0)), op, pos)
    return uses


def index_bounds(func: relax.Function, inputs: list[str]) -> dict[str, int]:
    """``{input: rows}`` for each of ``inputs`` that ``take`` uses as indices (views looked through):
    the smallest table it indexes along the taken axis."""
    bounds: dict[str, int] = {}
    for _, op, call, index, root in _reads(func, inputs):
        if op == "relax.take" and index == 1:
            table = [int(d) for d in call.args[0].ty.shape]
            rows = int(np.prod(table)) if call.attrs.axis is None else table[int(call.attrs.axis) % len(table)]
            bounds[root] = min(bounds.get(root, rows), rows)
    return bounds
