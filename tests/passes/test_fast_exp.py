"""FastExp: float32 exp and sigmoid in kernels become vector arithmetic within a rounding of libm."""

import numpy as np
import pytest
import torch
import tvm
from tvm import te, tirx

from helpers import SGD, assert_setting_keeps_numbers, labels
from pock_tvm.models import MLP
from pock_tvm.passes import FastExp
from pock_tvm.passes.fast_exp import fast_exp


def _module(fn, n=8, dtype="float32"):
    a = te.placeholder((n,), dtype, name="a")
    b = te.compute((n,), lambda i: fn(a[i]), name="b")
    return tvm.IRModule({"main": te.create_prim_func([a, b])})


def test_exp_and_sigmoid_become_the_polynomial():
    one = tirx.const(1.0, "float32")
    tvm.ir.assert_structural_equal(FastExp()(_module(te.exp)), _module(fast_exp))
    tvm.ir.assert_structural_equal(FastExp()(_module(te.sigmoid)), _module(lambda v: one / (one + fast_exp(-v))))


def test_float64_and_other_calls_are_kept():
    for mod in (_module(te.exp, dtype="float64"), _module(te.log)):
        tvm.ir.assert_structural_equal(FastExp()(mod), mod)


X = np.concatenate([np.linspace(-90, 90, 40001), [np.nan, np.inf, -np.inf, 0.0, 88.7, -1e30]]).astype("float32")


@pytest.mark.parametrize("op, reference", [(te.exp, np.exp), (te.sigmoid, lambda v: 1 / (1 + np.exp(-v)))])
def test_values_within_a_float32_rounding_and_special_values_kept(op, reference):
    lib = tvm.compile(FastExp()(_module(op, X.size)), target="llvm")
    out = tvm.runtime.tensor(np.zeros_like(X))
    lib(tvm.runtime.tensor(X), out)
    ours = out.numpy()
    with np.errstate(over="ignore"):
        exact = reference(X.astype("float64"))
    normal = np.isfinite(exact) & (np.abs(exact) > 2.5e-38) & (np.abs(exact) < 3e38)  # below: flushed to 0
    np.testing.assert_allclose(ours[normal], exact[normal], rtol=2e-7)
    tail = ours[-6:]
    assert np.isnan(tail[0])  # NaN is not clamped into a number
    if op is te.exp:
        assert tail[1] == np.inf and tail[2] == 0.0 and tail[3] == 1.0 and np.isfinite(tail[4]) and tail[5] == 0.0
    else:
        assert tail[1] == 1.0 and tail[2] == 0.0 and tail[3] == 0.5


def test_training_numbers_stay_with_fast_math_on_and_off():
    torch.manual_seed(0)
    x, y = torch.randn(8, 32), labels(8)
    assert_setting_keeps_numbers(MLP(), x, y, SGD, "full", "fast_math", rtol=1e-5)
