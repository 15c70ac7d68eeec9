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
