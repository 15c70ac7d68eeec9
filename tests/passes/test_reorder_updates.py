"""ReorderUpdates: updates follow their gradients; the values are those of the unordered step."""

import torch
from tvm import relax

import pock_tvm
from pock_tvm.options import PipelineOptions
from graphs import training_graph
from helpers import assert_setting_keeps_numbers
from pock_tvm.analysis.layers import bindings
from pock_tvm.models import MLP


def _positions(func):
    return {b.var.name: i for i, b in enumerate(bindings(func))}


def test_each_update_follows_its_gradient(small_cnn):
    mod, trainable = training_graph(small_cnn, "last-2", optimizer="adam")
    step = mod["train_step"]
    calls = [b.value for b in bindings(step) if isinstance(b.value, relax.Call)]
    assert not any(isinstance(c.op, relax.GlobalVar) for c in calls), "adjoints are inlined"
    pos = _positions(step)
    order = sorted(trainable, key=lambda t: pos[t + "_adjoint"])
    for earlier, later in zip(order, order[1:]):
        # the whole update of `earlier` (its new value is read by the output tuple) comes before
        # the gradient of `later` is even computed
        new_value = _output_var(step, trainable.index(earlier) + 1)
        assert pos[new_value] < pos[later + "_adjoint"]


def test_without_reordering_updates_come_after_the_backward_pass(small_cnn):
    mod, trainable = training_graph(small_cnn, "last-2", optimizer="adam",
                                     options=PipelineOptions(fold_frozen=False, reorder_updates=False))
    first = bindings(mod["train_step"])[0].value
    assert isinstance(first.op, relax.GlobalVar) and first.op.name_hint == "loss_adjoint"


def test_same_numbers_as_the_unordered_step():
    assert_setting_keeps_numbers(MLP(), torch.randn(4, 32), torch.randint(0, 10, (4,)),
                                 pock_tvm.Adam(lr=1e-2), "last-2", "reorder_updates")


def _output_var(step, index) -> str:
    ret = step.body.body
    last = bindings(step)[-1]
    tup = last.value if last.var.same_as(ret) else ret
    while isinstance(tup, relax.Var):
        tup = next(b.value for b in bindings(step) if b.var.same_as(tup))
    return tup.fields[index].name


# -- Before/Expected: train_step as AppendOptimizer writes it (SGD, two weights), and reordered

import tvm  # noqa: E402
from tvm.script import ir as I, relax as R  # noqa: E402

from pock_tvm.passes import ReorderUpdates  # noqa: E402

F32 = "float32"


@I.ir_module
class Before:
    @R.function
    def loss_adjoint(x: R.Tensor((2, 3), F32), w1: R.Tensor((3, 4), F32), w2: R.Tensor((4, 5), F32),
                     target: R.Tensor((2, 5), F32)):
        with R.dataflow():
            h = R.matmul(x, w1)
            d = R.subtract(R.matmul(h, w2), target)
            gv = R.sum(R.multiply(d, d))
            dy = R.multiply(R.const(2.0, F32), d)
            w2_grad = R.matmul(R.permute_dims(h), dy)
            dh = R.matmul(dy, R.permute_dims(w2))
            w1_grad = R.matmul(R.permute_dims(x), dh)
            R.output(gv, w1_grad, w2_grad)
        return (gv, (w1_grad, w2_grad))

    @R.function
    def train_step(x: R.Tensor((2, 3), F32), w1: R.Tensor((3, 4), F32), w2: R.Tensor((4, 5), F32),
                   target: R.Tensor((2, 5), F32), lr: R.Tensor((), F32), step: R.Tensor((), F32)):
        R.func_attr({"pock_tvm.trainable": ["w1", "w2"], "pock_tvm.state_names": []})
        cls = Before
        with R.dataflow():
            adjoint = cls.loss_adjoint(x, w1, w2, target)
            loss = adjoint[0]
            grads = adjoint[1]
            g1 = grads[0]
            new_w1 = R.subtract(w1, R.multiply(lr, g1))
            g2 = grads[1]
            new_w2 = R.subtract(w2, R.multiply(lr, g2))
            next_step = R.add(step, R.const(1.0, F32))
            out = (loss, new_w1, new_w2, next_step)
            R.output(out)
        return out


@I.ir_module
class Expected:
    @R.function
    def train_step(x: R.Tensor((2, 3), F32), w1: R.Tensor((3, 4), F32), w2: R.Tensor((4, 5), F32),
                   target: R.Tensor((2, 5), F32), lr: R.Tensor((), F32), step: R.Tensor((), F32)):
        R.func_attr({"pock_tvm.trainable": ["w1", "w2"], "pock_tvm.state_names": []})
        with R.dataflow():  # the adjoint inlined
            h = R.matmul(x, w1)
            y = R.matmul(h, w2)
            d = R.subtract(y, target)
            squares = R.multiply(d, d)
            gv = R.sum(squares)
            dy = R.multiply(R.const(2.0, F32), d)
            h_t = R.permute_dims(h)
            w2_grad = R.matmul(h_t, dy)
            w2_step = R.multiply(lr, w2_grad)
            w2_t = R.permute_dims(w2)  # the last read of the old w2 ...
            new_w2 = R.subtract(w2, w2_step)  # ... then its update, before w1's gradient exists
            dh = R.matmul(dy, w2_t)
            x_t = R.permute_dims(x)
            w1_grad = R.matmul(x_t, dh)
            w1_step = R.multiply(lr, w1_grad)
            new_w1 = R.subtract(w1, w1_step)
            next_step = R.add(step, R.const(1.0, F32))  # reads no gradient: just before its first user
            out = (gv, new_w1, new_w2, next_step)
            result = out
            R.output(result)
        return result


def test_each_update_moves_right_after_its_gradient_and_the_last_read_of_its_old_value():
    after = ReorderUpdates()(Before)
    tvm.ir.assert_structural_equal(after["train_step"], Expected["train_step"])
    tvm.ir.assert_structural_equal(after["loss_adjoint"], Before["loss_adjoint"])  # kept for analysis


def test_a_train_step_without_an_adjoint_call_is_an_error_naming_the_order():
    import pytest

    with pytest.raises(ValueError, match="run it right after AppendOptimizer"):
        ReorderUpdates()(ReorderUpdates()(Before))
