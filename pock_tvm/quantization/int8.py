"""The int8 conventions every quantization part shares: value ranges, per-channel scales and how a
quantized tensor is read in a Relax graph (``relax.dequantize``, as the ONNX QDQ importer writes it).

A quantized tensor ``q`` with scale ``s`` and zero point ``z`` stands for the float ``(q - z) * s``;
``s`` and ``z`` are scalars (per tensor) or vectors along ``axis`` (per channel). The *unit* of a
tensor is the float value of one step of ``q`` (``s``, broadcast to the tensor's rank): the
quantization-aware scaling of the optimizer (:mod:`pock_tvm.optim`) needs it.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

R = relax.op

RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "int32": (-2**31, 2**31 - 1)}
ACTIVATION_DTYPE = "int8"  # pock_tvm's own quantizer: symmetric int8, zero point 0
WEIGHT_DTYPE = "int8"
BIAS_DTYPE = "int32"


def is_integer(dtype: str) -> bool:
    return str(dtype).startswith(("int", "uint"))


def along(scale: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A scalar or per-channel ``scale`` shaped to broadcast against a rank-``ndim`` tensor whose
    channels are on ``axis``."""
    scale = np.asarray(scale)
    if scale.ndim == 0 or scale.size == 1:
        return scale.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = scale.size
    return scale.reshape(shape)


def along_expr(scale: relax.Expr, axis: int, ndim: int) -> relax.Expr:
    """:func:`along` for a Relax scale (a constant stays a constant, reshaped)."""
    value = constant(scale)
    if value is not None:
        return relax.const(along(value, axis, ndim), str(value.dtype))
    dims = [int(d) for d in scale.ty.shape]
    if not dims or int(np.prod(dims)) == 1:
        return scale if not dims else R.reshape(scale, ())
    shape = [1] * ndim
    shape[axis % ndim] = int(np.prod(dims))
    return R.reshape(scale, shape)


def dequantize_args(call) -> tuple[relax.Expr, relax.Expr, relax.Expr, int] | None:
    """``(q, scale, zero_point, axis)`` if ``call`` is ``relax.dequantize``, else None."""
    if isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.dequantize":
        q, scale, zero_point = call.args
        return q, scale, zero_point, int(call.attrs.axis)
    return None


def constant(expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def param_units(func: relax.Function) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """``{parameter name: (scale, zero_point, axis)}`` for every parameter of ``func`` that is read
    through ``relax.dequantize`` with constant scale and zero point: the quantized weights (and
    int32 biases) of an int8 model."""
    found = {}
    params = {p for p in func.params}

    def visit(expr) -> None:
        args = dequantize_args(expr)
        if args and args[0] in params:
            scale, zero_point = constant(args[1]), constant(args[2])
            if scale is not None and zero_point is not None:
                found[args[0].name] = (scale, zero_point, args[3])

    relax.analysis.post_order_visit(func.body, visit)
    return found
