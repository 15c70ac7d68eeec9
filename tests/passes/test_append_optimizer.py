"""AppendLoss and AppendOptimizer: the signatures the runtime relies on."""

from graphs import training_graph


def test_loss_takes_forward_inputs_then_target(small_cnn):
    mod, _ = training_graph(small_cnn, "last-1")
    forward = [p.name for p in mod["forward"].params]
    loss = [p.name for p in mod["loss"].params]
    assert loss[:-1] == forward and loss[-1] == "target"
    assert len(mod["loss"].ret_ty.shape) == 0


def test_train_step_signature_and_outputs(small_cnn):
    mod, trainable = training_graph(small_cnn, "last-1", optimizer="adam")
    assert trainable == ["p_classifier_weight", "p_classifier_bias"]
    step = mod["train_step"]
    names = [p.name for p in step.params]
    loss_params = [p.name for p in mod["loss"].params]
    states = [f"{t}.{s}" for t in trainable for s in ("exp_avg", "exp_avg_sq")]
    assert names == loss_params + ["lr", "step"] + states
    # (loss, 2 new parameters, new step, 4 new states)
    assert len(step.ret_ty.fields) == 1 + 2 + 1 + 4
    assert list(step.attrs["pock_tvm.trainable"]) == trainable


# -- Before/Expected: the module AppendOptimizer reads (loss, loss_adjoint) and the train_step it adds

import tvm  # noqa: E402
from tvm.script import ir as I, relax as R  # noqa: E402

from pock_tvm.optim import SGD  # noqa: E402
from pock_tvm.passes import AppendOptimizer  # noqa: E402


@I.ir_module
class Before:
    @R.function
    def loss(x: R.Tensor((2, 3), "float32"), w: R.Tensor((3, 4), "float32"), target: R.Tensor((2, 4), "float32")):
        with R.dataflow():
            d = R.subtract(R.matmul(x, w), target)
            gv = R.sum(R.multiply(d, d))
            R.output(gv)
        return gv

    @R.function
    def loss_adjoint(x: R.Tensor((2, 3), "float32"), w: R.Tensor((3, 4), "float32"),
                     target: R.Tensor((2, 4), "float32")):
        with R.dataflow():
            d = R.subtract(R.matmul(x, w), target)
            gv = R.sum(R.multiply(d, d))
            w_grad = R.matmul(R.permute_dims(x), R.multiply(R.const(2.0, "float32"), d))
            R.output(gv, w_grad)
        return (gv, (w_grad,))


@I.ir_module
class Expected:
    @R.function
    def loss(x: R.Tensor((2, 3), "float32"), w: R.Tensor((3, 4), "float32"), target: R.Tensor((2, 4), "float32")):
        with R.dataflow():
            d = R.subtract(R.matmul(x, w), target)
            gv = R.sum(R.multiply(d, d))
            R.output(gv)
        return gv

    @R.function
    def loss_adjoint(x: R.Tensor((2, 3), "float32"), w: R.Tensor((3, 4), "float32"),
                     target: R.Tensor((2, 4), "float32")):
        with R.dataflow():
            d = R.subtract(R.matmul(x, w), target)
            gv = R.sum(R.multiply(d, d))
            w_grad = R.matmul(R.permute_dims(x), R.multiply(R.const(2.0, "float32"), d))
            R.output(gv, w_grad)
        return (gv, (w_grad,))

    @R.function
    def train_step(x: R.Tensor((2, 3), "float32"), w: R.Tensor((3, 4), "float32"),
                   target: R.Tensor((2, 4), "float32"), lr: R.Tensor((), "float32"), step: R.Tensor((), "float32"),
                   w_buf: R.Tensor((3, 4), "float32")):
        R.func_attr({"pock_tvm.trainable": ["w"], "pock_tvm.state_names": ["momentum_buffer"]})
        cls = Expected
        with R.dataflow():
            adjoint = cls.loss_adjoint(x, w, target)
            loss = adjoint[0]
            grads = adjoint[1]
            grad = grads[0]
            # torch's SGD momentum: buf = grad on the first step (step < 0.5), then 0.9 buf + grad
            buf = R.add(R.multiply(R.const(0.9, "float32"), w_buf),
                        R.multiply(R.where(R.less(step, R.const(0.5, "float32")), R.const(1.0, "float32"),
                                           R.const(1.0, "float32")), grad))
            new_w = R.subtract(w, R.multiply(lr, buf))
            next_step = R.add(step, R.const(1.0, "float32"))
            out = (loss, new_w, next_step, buf)
            R.output(out)
        return out


def test_train_step_is_the_adjoint_then_the_update_inline_in_the_calling_convention_order():
    after = AppendOptimizer(SGD(lr=0.1, momentum=0.9), ["w"])(Before)
    # (x, w, target, lr, step, w.momentum_buffer) -> (loss, new w, new step, new w.momentum_buffer)
    assert [p.name for p in after["train_step"].params] == ["x", "w", "target", "lr", "step", "w.momentum_buffer"]
    tvm.ir.assert_structural_equal(after, Expected)


def test_no_optimizer_is_an_error_naming_the_fix():
    import pytest

    with pytest.raises(ValueError, match="pass optimizer=SGD"):
        AppendOptimizer(None, ["w"])(Before)
