"""QuantizeForward: int8 weights read through dequantize, each layer input fake-quantized once."""

import numpy as np
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from pock_tvm.passes.quantize_forward import OpScales, QuantizeForward, quantizable_ops, read_scales

SW = np.array([0.5, 0.25], "float32")


@I.ir_module
class Before:
    @R.function
    def forward(x: R.Tensor((1, 3, 4, 4), "float32"), w: R.Tensor((2, 3, 1, 1), "float32"),
                v: R.Tensor((2, 2), "float32")):
        with R.dataflow():
            c = R.nn.conv2d(x, w)
            r = R.nn.relu(c)
            m = R.mean(r, axis=[2, 3])
            vt = R.permute_dims(v, axes=[1, 0])
            y = R.matmul(m, vt)
            s = R.add(y, m)  # a second reader of the linear layer's input
            R.output(s)
        return s


@I.ir_module
class Expected:
    @R.function
    def forward(x: R.Tensor((1, 3, 4, 4), "float32"), w: R.Tensor((2, 3, 1, 1), "int8"),
                v: R.Tensor((2, 2), "int8")):
        with R.dataflow():
            x_q = R.dequantize(R.quantize(x, R.const(0.1, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8"),
                               R.const(0.1, "float32"), R.const(0, "int8"), axis=-1, out_dtype="float32")
            w_dq = R.dequantize(w, R.const(SW), R.const(0, "int8"), axis=0, out_dtype="float32")
            c = R.nn.conv2d(x_q, w_dq)
            r = R.nn.relu(c)
            m = R.mean(r, axis=[2, 3])
            x_q1 = R.dequantize(R.quantize(m, R.const(0.05, "float32"), R.const(0, "int8"), axis=-1,
                                           out_dtype="int8"),
                                R.const(0.05, "float32"), R.const(0, "int8"), axis=-1, out_dtype="float32")
            w_dq1 = R.dequantize(v, R.const(SW), R.const(0, "int8"), axis=0, out_dtype="float32")
            vt = R.permute_dims(w_dq1, axes=[1, 0])
            y = R.matmul(x_q1, vt)
            s = R.add(y, x_q1)
            R.output(s)
        return s


SCALES = {"w": OpScales(0.1, SW), "v": OpScales(0.05, SW)}


def test_weights_become_int8_and_every_reader_sees_the_quantized_input():
    tvm.ir.assert_structural_equal(QuantizeForward(SCALES)(Before), Expected)


def test_layers_are_found_in_float_and_int8_graphs_and_scales_read_back():
    assert {k: v.name for k, v in quantizable_ops(Before["forward"]).items()} == {"w": "x", "v": "m"}
    assert set(quantizable_ops(Expected["forward"])) == {"w", "v"}
    back = read_scales(Expected["forward"])
    assert back["w"].activation == pytest.approx(0.1) and back["v"].activation == pytest.approx(0.05)
    np.testing.assert_array_equal(back["w"].weight, SW)


@I.ir_module
class ReadElsewhere:
    @R.function
    def forward(x: R.Tensor((1, 3, 4, 4), "float32"), w: R.Tensor((2, 3, 1, 1), "float32")):
        with R.dataflow():
            c = R.nn.conv2d(x, w)
            d = R.sum(w)
            y = R.add(c, d)
            R.output(y)
        return y


def test_errors_name_the_weight():
    with pytest.raises(ValueError, match=r"QuantizeForward: weight w is read by relax.sum"):
        QuantizeForward({"w": OpScales(0.1, SW)})(ReadElsewhere)
    with pytest.raises(ValueError, match=r"QuantizeForward: \['x'\] are not weights of a conv2d or linear layer"):
        QuantizeForward({"x": OpScales(0.1, SW)})(Before)
