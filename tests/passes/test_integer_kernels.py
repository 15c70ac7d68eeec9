"""IntegerKernels: int8 x int8 -> int32 convs and linears, int8 kept for the backward pass."""

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from pock_tvm.passes.integer_kernels import IntegerKernels

SW = np.array([0.5, 0.25], "float32")
W = np.array([[1, -2, 3], [4, 5, -6]], "int8")
W4 = W.reshape(2, 3, 1, 1)


@I.ir_module
class Before:
    @R.function
    def forward(x: R.Tensor((1, 3, 4, 4), "float32"), v: R.Tensor((2, 3), "int8")):
        with R.dataflow():
            q = R.quantize(x, R.const(0.1, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            d = R.dequantize(q, R.const(0.1, "float32"), R.const(0, "int8"), axis=-1, out_dtype="float32")
            w_dq = R.dequantize(R.const(W4), R.const(SW), R.const(0, "int8"), axis=0, out_dtype="float32")
            c = R.nn.conv2d(d, w_dq)
            e = R.nn.relu(d)  # another reader of the dequantized input
            m = R.mean(x, axis=[2, 3])
            qm = R.quantize(m, R.const(0.05, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            dm = R.dequantize(qm, R.const(0.05, "float32"), R.const(0, "int8"), axis=-1, out_dtype="float32")
            v_dq = R.dequantize(v, R.const(SW), R.const(0, "int8"), axis=0, out_dtype="float32")
            vt = R.permute_dims(v_dq, axes=[1, 0])
            y = R.matmul(dm, vt)
            R.output(c, e, y)
        return (c, e, y)


@I.ir_module
class Expected:
    @R.function
    def forward(x: R.Tensor((1, 3, 4, 4), "float32"), v: R.Tensor((2, 3), "int8")):
        with R.dataflow():
            q = R.quantize(x, R.const(0.1, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            acc = R.nn.conv2d(q, R.const(W4), out_dtype="int32")
            c = R.multiply(R.astype(acc, "float32"), R.const((0.1 * SW).reshape(1, 2, 1, 1)))
            x_dq = R.dequantize(q, R.const(0.1, "float32"), R.const(0, "int8"), axis=-1, out_dtype="float32")
            e = R.nn.relu(x_dq)
            m = R.mean(x, axis=[2, 3])
            qm = R.quantize(m, R.const(0.05, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            acc1 = R.matmul(qm, R.permute_dims(v, axes=[1, 0]), out_dtype="int32")
            y = R.multiply(R.astype(acc1, "float32"), R.const(0.05 * SW))
            R.output(c, e, y)
        return (c, e, y)


def test_integer_conv_and_linear_and_recomputed_dequantize():
    tvm.ir.assert_structural_equal(IntegerKernels()(Before), Expected)


def test_numbers_equal_the_float_simulation():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 3, 4, 4)).astype("float32")
    v = rng.integers(-127, 128, (2, 3)).astype("int8")
    target = tvm.target.Target({"kind": "llvm"})
    outs = []
    for mod in (Before, IntegerKernels()(Before)):
        vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
        outs.append([t.numpy() for t in vm["forward"](tvm.runtime.tensor(x), tvm.runtime.tensor(v))])
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@I.ir_module
class TrainedWeight:
    @R.function
    def forward(x: R.Tensor((1, 3, 4, 4), "float32"), w: R.Tensor((2, 3, 1, 1), "float32")):
        with R.dataflow():
            q = R.quantize(x, R.const(0.1, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            d = R.dequantize(q, R.const(0.1, "float32"), R.const(0, "int8"), axis=-1, out_dtype="float32")
            c = R.nn.conv2d(d, R.multiply(w, R.const(SW.reshape(2, 1, 1, 1))))
            R.output(c)
        return c


def test_a_float_master_weight_stays_a_float_conv():
    after = IntegerKernels()(TrainedWeight)["forward"]
    convs = []
    tvm.relax.analysis.post_order_visit(after.body, lambda e: convs.append(e) if isinstance(e, tvm.relax.Call)
                                        and getattr(e.op, "name", "") == "relax.nn.conv2d" else None)
    assert [c.args[0].ty.dtype for c in convs] == ["float32"]
