"""BindFrozenParams: frozen tensors become constants and leave the signature; misuse is refused."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from pock_tvm.passes import BindFrozenParams

W = np.arange(6, dtype="float32").reshape(2, 3)


@I.ir_module
class Before:
    @R.function
    def forward(x: R.Tensor((4, 3), "float32"), w: R.Tensor((2, 3), "float32"), b: R.Tensor((2,), "float32")):
        with R.dataflow():
            t = R.matmul(x, R.permute_dims(w, [1, 0]))
            y = R.add(t, b)
            R.output(y)
        return y


def _expected():
    @I.ir_module
    class Expected:
        @R.function
        def forward(x: R.Tensor((4, 3), "float32"), b: R.Tensor((2,), "float32")):
            with R.dataflow():
                t = R.matmul(x, R.permute_dims(R.const(W), [1, 0]))
                y = R.add(t, b)
                R.output(y)
            return y

    return Expected


def test_frozen_weight_becomes_a_constant():
    after = BindFrozenParams({"w": W}, trainable=["b"])(Before)
    tvm.ir.assert_structural_equal(after, _expected())


@pytest.mark.parametrize("values, trainable, message", [
    ({"b": np.zeros(2, "float32")}, ["b"], r"\['b'\] are trainable"),
    ({"v": W}, [], r"\['v'\] are not parameters of forward.*W__frz"),
    ({"w": W.T.copy()}, [], r"w is float32\[2, 3\] in the model but the value is float32\[3, 2\]"),
])
def test_bad_bindings_are_explained(values, trainable, message):
    with pytest.raises(ValueError, match=r"BindFrozenParams: " + message):
        BindFrozenParams(values, trainable)(Before)


def test_nothing_to_bind_keeps_the_module():
    assert BindFrozenParams({})(Before).same_as(Before)
    assert isinstance(Before["forward"], relax.Function)
