"""UnbroadcastLinear: a batched matmul over an expanded weight becomes a plain linear layer."""

import numpy as np
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from pock_tvm.passes.unbroadcast_linear import UnbroadcastLinear


@I.ir_module
class Before:
    @R.function
    def forward(x: R.Tensor((2, 5, 4), "float32"), w: R.Tensor((3, 4), "float32")):
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            copies = R.broadcast_to(wt, R.shape([2, 4, 3]))
            y = R.matmul(x, copies)
            R.output(y)
        return y


@I.ir_module
class Expected:
    @R.function
    def forward(x: R.Tensor((2, 5, 4), "float32"), w: R.Tensor((3, 4), "float32")):
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            y = R.matmul(x, wt)
            R.output(y)
        return y


def test_expanded_weight_becomes_the_weight():
    tvm.ir.assert_structural_equal(UnbroadcastLinear()(Before), Expected)


@I.ir_module
class BroadcastsInputBatch:  # x has batch 1, the copy batch 2: the copy is not a view of the weight
    @R.function
    def forward(x: R.Tensor((1, 5, 4), "float32"), w: R.Tensor((4, 3), "float32")):
        with R.dataflow():
            copies = R.broadcast_to(w, R.shape([2, 4, 3]))
            y = R.matmul(x, copies)
            R.output(y)
        return y


def test_a_copy_that_broadcasts_the_input_batch_is_kept():
    tvm.ir.assert_structural_equal(UnbroadcastLinear()(BroadcastsInputBatch), BroadcastsInputBatch)


def test_same_numbers():
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype("float32")
    w = np.random.default_rng(1).standard_normal((3, 4)).astype("float32")
    outs = []
    for mod in (Before, UnbroadcastLinear()(Before)):
        exe = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
        outs.append(tvm.relax.VirtualMachine(exe, tvm.cpu())["forward"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy())
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)
    np.testing.assert_allclose(outs[1], x @ w.T, rtol=1e-5)


def test_missing_function_is_an_error():
    with pytest.raises(ValueError, match="UnbroadcastLinear: the module has no function 'main'"):
        UnbroadcastLinear("main")(Before)
