"""TrainQuantizedParams: a trained int8 weight becomes a float32 master in integer units."""

import numpy as np
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from pock_tvm.passes.train_quantized_params import TrainQuantizedParams

SW = np.array([0.5, 0.25], "float32")


@I.ir_module
class Before:
    @R.function
    def forward(x: R.Tensor((1, 3, 4, 4), "float32"), w: R.Tensor((2, 3, 1, 1), "int8"),
                b: R.Tensor((2,), "int32")):
        with R.dataflow():
            w_dq = R.dequantize(w, R.const(SW), R.const(0, "int8"), axis=0, out_dtype="float32")
            c = R.nn.conv2d(x, w_dq)
            b_dq = R.dequantize(b, R.const(SW), R.const(3, "int32"), axis=0, out_dtype="float32")
            y = R.add(c, R.reshape(b_dq, (1, 2, 1, 1)))
            R.output(y)
        return y


@I.ir_module
class Expected:
    @R.function
    def forward(x: R.Tensor((1, 3, 4, 4), "float32"), w: R.Tensor((2, 3, 1, 1), "float32"),
                b: R.Tensor((2,), "float32")):
        with R.dataflow():
            conv_q = R.nn.conv2d(x, w)
            c = R.multiply(conv_q, R.const(SW.reshape(1, 2, 1, 1)))
            b_dq = R.multiply(R.subtract(b, R.astype(R.const(3, "int32"), "float32")), R.const(SW))
            y = R.add(c, R.reshape(b_dq, (1, 2, 1, 1)))
            R.output(y)
        return y


def test_trained_int8_params_become_float_masters_with_the_same_arithmetic():
    tvm.ir.assert_structural_equal(TrainQuantizedParams(["w", "b"])(Before), Expected)


def test_numbers_are_unchanged():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 4, 4)).astype("float32")
    w = rng.integers(-127, 128, (2, 3, 1, 1)).astype("int8")
    b = np.array([5, -7], "int32")
    target = tvm.target.Target({"kind": "llvm"})
    outs = []
    for mod, args in ((Before, (x, w, b)), (TrainQuantizedParams(["w", "b"])(Before), (x, w.astype("float32"),
                                                                                        b.astype("float32")))):
        vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
        outs.append(vm["forward"](*map(tvm.runtime.tensor, args)).numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6)


def test_unlisted_params_stay_integer():
    after = TrainQuantizedParams(["w"])(Before)["forward"]
    assert [p.ty.dtype for p in after.params] == ["float32", "float32", "int32"]


def test_errors():
    with pytest.raises(ValueError, match=r"TrainQuantizedParams: \['x'\] are not integer parameters"):
        TrainQuantizedParams(["x"])(Before)
