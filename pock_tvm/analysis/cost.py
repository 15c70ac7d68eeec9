"""FLOPs and bytes of a Relax training graph, read off the ops and their static shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from .layers import bindings

_FREE = {"relax.reshape", "relax.permute_dims", "relax.split", "relax.squeeze", "relax.flatten",
         "relax.expand_dims", "relax.grad.no_grad", "relax.zeros", "relax.ones"}


def nbytes(ty) -> int:
    """Bytes of a tensor type, or of every tensor inside a tuple type."""
    if isinstance(ty, relax.TupleType):
        return sum(nbytes(f) for f in ty.fields)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return 0
    return math.prod(int(d) for d in ty.shape) * np.dtype(str(ty.dtype)).itemsize


def _numel(ty) -> int:
    return math.prod(int(d) for d in ty.shape) if isinstance(ty, relax.TensorType) else 0


def flops(call: relax.Call, out_ty) -> int:
    """Multiply-adds count twice; elementwise and reductions count one per element."""
    op = call.op.name if isinstance(call.op, tvm.ir.Op) else ""
    if op in _FREE:
        return 0
    if op == "relax.nn.conv2d":
        w = [int(d) for d in call.args[1].ty.shape]
        layout = str(call.attrs.kernel_layout)
        i_per_group = w[layout.index("I")]
        kh, kw = w[layout.index("H")], w[layout.index("W")]
        return 2 * _numel(out_ty) * i_per_group * kh * kw
    if op == "relax.nn.conv2d_transpose":
        w = [int(d) for d in call.args[1].ty.shape]
        return 2 * _numel(call.args[0].ty) * math.prod(w[1:])
    if op == "relax.matmul":
        k = int(call.args[0].ty.shape[-1])
        return 2 * _numel(out_ty) * k
    return max(_numel(out_ty), max((_numel(a.ty) for a in call.args if hasattr(a, "ty")), default=0))


@dataclass
class GraphCost:
    forward_flops: int
    backward_flops: int
    saved_activation_bytes: int
    gradient_bytes: int
    backward_ops: dict[str, int]


def adjoint_parts(mod: tvm.IRModule, loss_name: str = "loss"):
    """Forward and backward bindings of the adjoint: ``<loss>_adjoint`` computes the frozen
    prefix, ``<loss>__tail_adjoint`` the rest of the forward and then the backward."""
    tail = mod[loss_name + "__tail_adjoint"]
    split = int(tail.attrs["pock_tvm.num_forward_bindings"])
    tail_bindings = bindings(tail)
    return bindings(mod[loss_name + "_adjoint"]) + tail_bindings[:split], tail_bindings[split:]


def training_cost(mod: tvm.IRModule, trainable: list[str], loss_name: str = "loss") -> GraphCost:
    """FLOPs of both parts, bytes of forward values the backward reads, bytes of gradients."""
    forward, backward = adjoint_parts(mod, loss_name)
    forward_ty = {b.var: b.var.ty for b in forward}
    forward_ty.update({p: p.ty for p in mod[loss_name + "__tail_adjoint"].params
                       if p.name not in {q.name for q in mod[loss_name].params}})
    fwd = sum(flops(b.value, b.var.ty) for b in forward if _is_op_call(b.value))
    bwd = 0
    ops: dict[str, int] = {}
    saved: dict = {}
    for binding in backward:
        value = binding.value
        if not _is_op_call(value):
            continue
        bwd += flops(value, binding.var.ty)
        ops[value.op.name] = ops.get(value.op.name, 0) + 1
        for arg in value.args:
            if isinstance(arg, relax.Var) and arg in forward_ty:
                saved[arg] = nbytes(forward_ty[arg])
    grads = sum(nbytes(p.ty) for p in mod[loss_name].params if p.name in set(trainable))
    return GraphCost(fwd, bwd, sum(saved.values()), grads, ops)


def _is_op_call(value) -> bool:
    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)


def kernel_flops(lowered: tvm.IRModule) -> dict[str, int]:
    """Floating-point operations of one call of each TIR kernel of a lowered module (TVM's
    estimate; kernels it cannot count are left out)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    out = {}
    for gvar, func in lowered.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            try:
                out[gvar.name_hint] = int(estimate_tir_flops(tvm.IRModule({"main": func})))
            except Exception:  # noqa: BLE001 -- TVM's estimator rejects some loop nests; profile shows no rate
                continue
    return out
