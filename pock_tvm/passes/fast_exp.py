"""FastExp: float32 ``exp`` and ``sigmoid`` in CPU kernels as a polynomial that vectorizes."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

from .utils import with_functions


# Cephes expf: exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts, exact
# product with n), exp(r) by a degree-7 polynomial; relative error about 1e-7
LOG2E = 1.44269504088896341
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4
POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
# inputs are clamped to [LOW, HIGH]: below LOW exp is under 2.4e-38 and returns 0 (as a CPU that
# flushes denormals); at HIGH (above ln(FLT_MAX) = 88.72) the result overflows to inf as exp does
LOW, HIGH = -86.6, 89.0


def fast_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``exp(x)`` of a float32 expression as arithmetic; NaN stays NaN, +inf gives inf, -inf 0."""
    f = lambda v: tirx.const(v, "float32")  # noqa: E731
    c = tirx.max(tirx.min(x, f(HIGH)), f(LOW))
    n = tirx.floor(c * f(LOG2E) + f(0.5))  # in [-125, 128]
    r = c - n * f(LN2_HI) - n * f(LN2_LO)
    p = f(POLY[0])
    for coefficient in POLY[1:]:
        p = p * r + f(coefficient)
    e = p * r * r + r + f(1.0)
    # 2^n as 2^(n-1) * 2: the exponent field n + 126 stays in [1, 254] (2^128 alone is not a float)
    half = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n) + 126, tirx.const(23, "int32")))
    y = tirx.if_then_else(x < f(LOW), f(0.0), e * half * f(2.0))
    return tirx.if_then_else(tirx.isnan(x), x, y)


def _rewrite(node: tvm.ir.Call):
    if str(node.ty) != "float32" or not isinstance(node.op, tvm.ir.Op):
        return node
    if node.op.name == "tirx.exp":
        return fast_exp(node.args[0])
    if node.op.name == "tirx.sigmoid":
        return tirx.const(1.0, "float32") / (tirx.const(1.0, "float32") + fast_exp(-node.args[0]))
    return node


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.FastExp")
class FastExp:
    """Reads the TIR kernels; rewrites every float32 ``exp`` and ``sigmoid`` into :func:`fast_exp`.

    LLVM lowers ``exp`` to a libm call per vector lane, which serializes every loop that holds one:
    softmax, SiLU, the log-softmax of an LM head over 49152 words (1 GFLOP/s). The polynomial is
    plain vector arithmetic. Results differ from libm by about one float32 rounding; NaN and
    infinities are kept. For CPU targets, after the schedules (GPU targets have a fast exp).
    """

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gvar, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc):
                body = tvm_ffi.structural_map(func.body, (tvm.ir.Call, _rewrite))
                if not body.same_as(func.body):
                    updates[gvar] = func.with_body(body)
        return with_functions(mod, updates)
