"""AppendLoss: forward and the loss inlined into one dataflow block, taking forward's arguments and
then the target; forward is kept for inference."""

import pytest
import tvm
from tvm import relax
from tvm.script import ir as I, relax as R

from pock_tvm.loss import MSE
from pock_tvm.passes import AppendLoss
from pock_tvm.runtime.spec import TensorSpec


@I.ir_module
class Before:
    @R.function
    def forward(x: R.Tensor((2, 3), "float32"), w: R.Tensor((3, 4), "float32")):
        with R.dataflow():
            y = R.matmul(x, w)
            R.output(y)
        return y


@I.ir_module
class Expected:
    @R.function
    def loss(x: R.Tensor((2, 3), "float32"), w: R.Tensor((3, 4), "float32"), target: R.Tensor((2, 4), "float32")):
        with R.dataflow():
            y = R.matmul(x, w)
            diff = R.subtract(y, target)
            gv = R.mean(R.multiply(diff, diff), axis=None, keepdims=False)
            R.output(gv)
        return gv


def test_loss_is_forward_then_the_loss_in_one_block_and_forward_is_kept():
    after = AppendLoss(MSE().relax_function(TensorSpec("output", (2, 4), "float32")))(Before)
    tvm.ir.assert_structural_equal(after["loss"], relax.transform.Normalize()(Expected)["loss"])
    tvm.ir.assert_structural_equal(after["forward"], Before["forward"])


def test_a_loss_that_is_not_a_scalar_is_refused():
    bb = relax.BlockBuilder()
    p, t = relax.Var("prediction", relax.TensorType((2, 4), "float32")), relax.Var("target", relax.TensorType((2, 4), "float32"))
    with bb.function("loss", [p, t]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.subtract(p, t))
        bb.emit_func_output(out)
    with pytest.raises(ValueError, match=r"AppendLoss: the loss must return a scalar tensor"):
        AppendLoss(bb.get()["loss"])(Before)
    with pytest.raises(ValueError, match=r"AppendLoss: no loss function given"):
        AppendLoss()(Before)
