"""InPlaceUpdates: every update is written in place, with the values of the functional step."""

import torch

import pock_tvm
from pock_tvm.options import PipelineOptions
from pock_tvm.models import MLP
from pock_tvm.passes.pipeline import pock_tvm_pipeline
from graphs import training_graph
from helpers import assert_setting_keeps_numbers


def _lowered(imported, scheme, optimizer, in_place):
    mod, _ = training_graph(imported, scheme, optimizer=optimizer)
    return pock_tvm_pipeline(build_training_graph=False, options=PipelineOptions(in_place=in_place))(mod)


def test_every_update_is_in_place_and_planned_storage_shrinks(small_cnn):
    from pock_tvm.analysis.memory import planned_bytes

    on = _lowered(small_cnn, "last-2", "adam", True)
    off = _lowered(small_cnn, "last-2", "adam", False)
    # 5 parameters, the step counter and 2 Adam states per parameter
    assert int(on["train_step"].attrs["pock_tvm.in_place"]) == 5 + 1 + 10
    assert "pock_tvm.in_place" not in off["train_step"].attrs
    assert planned_bytes(on)["storage"] < planned_bytes(off)["storage"]


def test_in_place_values_match_the_functional_step():
    torch.manual_seed(0)
    assert_setting_keeps_numbers(MLP(), torch.randn(4, 32), torch.randint(0, 10, (4,)),
                                 pock_tvm.SGD(lr=0.1, momentum=0.9), "full", "in_place")


# -- Before/Expected: train_step after CallTIRRewrite (explicit output tensors), SGD on one weight

import pytest  # noqa: E402
import tvm  # noqa: E402
from tvm.script import ir as I, relax as R, tirx as T  # noqa: E402

from pock_tvm.passes import InPlaceUpdates  # noqa: E402


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def grad(x: T.Buffer((4,), "float32"), w: T.Buffer((4,), "float32"), out: T.Buffer((4,), "float32")):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        for i in range(4):
            with T.sblock("grad"):
                vi = T.axis.spatial(4, i)
                out[vi] = x[vi] * w[vi]

    @T.prim_func(private=True, s_tir=True)
    def total(g: T.Buffer((4,), "float32"), out: T.Buffer((), "float32")):
        T.func_attr({"op_pattern": 3, "tirx.noalias": True})
        for k in range(4):
            with T.sblock("total"):
                vk = T.axis.reduce(4, k)
                with T.init():
                    out[()] = T.float32(0.0)
                out[()] = out[()] + g[vk]

    @T.prim_func(private=True, s_tir=True)
    def sgd(lr: T.Buffer((), "float32"), g: T.Buffer((4,), "float32"), w: T.Buffer((4,), "float32"),
            out: T.Buffer((4,), "float32")):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        for i in range(4):
            with T.sblock("sgd"):
                vi = T.axis.spatial(4, i)
                out[vi] = w[vi] - lr[()] * g[vi]

    @T.prim_func(private=True, s_tir=True)
    def count(step: T.Buffer((), "float32"), out: T.Buffer((), "float32")):
        T.func_attr({"op_pattern": 0, "tirx.noalias": True})
        with T.sblock("count"):
            out[()] = step[()] + T.float32(1.0)

    @R.function
    def train_step(x: R.Tensor((4,), "float32"), w: R.Tensor((4,), "float32"), lr: R.Tensor((), "float32"),
                   step: R.Tensor((), "float32")):
        R.func_attr({"pock_tvm.trainable": ["w"], "pock_tvm.state_names": [], "relax.force_pure": True})
        cls = Before
        g = R.builtin.alloc_tensor(R.shape([4]), R.dtype("float32"), 0, R.str("global"))
        cls.grad(x, w, g)
        loss = R.builtin.alloc_tensor(R.shape([]), R.dtype("float32"), 0, R.str("global"))
        cls.total(g, loss)
        new_w = R.builtin.alloc_tensor(R.shape([4]), R.dtype("float32"), 0, R.str("global"))
        cls.sgd(lr, g, w, new_w)
        new_step = R.builtin.alloc_tensor(R.shape([]), R.dtype("float32"), 0, R.str("global"))
        cls.count(step, new_step)
        return (loss, new_w, new_step)


@I.ir_module
class BeforeLateRead:
    # the kernels: Before's, put in by _with_kernels_of_before (only their signatures here)
    @T.prim_func(private=True, s_tir=True)
    def grad(x: T.Buffer((4,), "float32"), w: T.Buffer((4,), "float32"), out: T.Buffer((4,), "float32")):
        T.evaluate(0)

    @T.prim_func(private=True, s_tir=True)
    def total(g: T.Buffer((4,), "float32"), out: T.Buffer((), "float32")):
        T.evaluate(0)

    @T.prim_func(private=True, s_tir=True)
    def sgd(lr: T.Buffer((), "float32"), g: T.Buffer((4,), "float32"), w: T.Buffer((4,), "float32"),
            out: T.Buffer((4,), "float32")):
        T.evaluate(0)

    @T.prim_func(private=True, s_tir=True)
    def count(step: T.Buffer((), "float32"), out: T.Buffer((), "float32")):
        T.evaluate(0)

    @R.function
    def train_step(x: R.Tensor((4,), "float32"), w: R.Tensor((4,), "float32"), lr: R.Tensor((), "float32"),
                   step: R.Tensor((), "float32")):
        R.func_attr({"pock_tvm.trainable": ["w"], "pock_tvm.state_names": [], "relax.force_pure": True})
        cls = BeforeLateRead
        g = R.builtin.alloc_tensor(R.shape([4]), R.dtype("float32"), 0, R.str("global"))
        cls.grad(x, w, g)
        loss = R.builtin.alloc_tensor(R.shape([]), R.dtype("float32"), 0, R.str("global"))
        cls.total(g, loss)
        new_w = R.builtin.alloc_tensor(R.shape([4]), R.dtype("float32"), 0, R.str("global"))
        cls.sgd(lr, g, w, new_w)
        late = R.builtin.alloc_tensor(R.shape([4]), R.dtype("float32"), 0, R.str("global"))
        cls.grad(x, w, late)  # reads the old w after its update
        new_step = R.builtin.alloc_tensor(R.shape([]), R.dtype("float32"), 0, R.str("global"))
        cls.count(step, new_step)
        return (loss, new_w, new_step)


@I.ir_module
class Expected:
    # the kernels: Before's, put in by _with_kernels_of_before (only their signatures here)
    @T.prim_func(private=True, s_tir=True)
    def grad(x: T.Buffer((4,), "float32"), w: T.Buffer((4,), "float32"), out: T.Buffer((4,), "float32")):
        T.evaluate(0)

    @T.prim_func(private=True, s_tir=True)
    def total(g: T.Buffer((4,), "float32"), out: T.Buffer((), "float32")):
        T.evaluate(0)

    @T.prim_func(private=True, s_tir=True)
    def sgd(lr: T.Buffer((), "float32"), g: T.Buffer((4,), "float32"), w: T.Buffer((4,), "float32"),
            out: T.Buffer((4,), "float32")):
        T.evaluate(0)

    @T.prim_func(private=True, s_tir=True)
    def count(step: T.Buffer((), "float32"), out: T.Buffer((), "float32")):
        T.evaluate(0)

    @R.function
    def train_step(x: R.Tensor((4,), "float32"), w: R.Tensor((4,), "float32"), lr: R.Tensor((), "float32"),
                   step: R.Tensor((), "float32")):
        R.func_attr({"pock_tvm.trainable": ["w"], "pock_tvm.state_names": [], "relax.force_pure": True,
                     "pock_tvm.in_place": 2})
        cls = Expected
        g = R.builtin.alloc_tensor(R.shape([4]), R.dtype("float32"), 0, R.str("global"))
        cls.grad(x, w, g)
        loss = R.builtin.alloc_tensor(R.shape([]), R.dtype("float32"), 0, R.str("global"))
        cls.total(g, loss)
        new_w = w  # the update writes over the old weight: no allocation, no copy
        cls.sgd(lr, g, w, new_w)
        new_step = step  # and the step counter over the old one
        cls.count(step, new_step)
        return (loss, new_w, new_step)


def _with_kernels_of_before(mod):
    """``mod`` with each kernel replaced by Before's of the same name (under ``mod``'s own GlobalVar)."""
    mod = tvm.IRModule(dict(mod.functions.items()))
    for gvar, func in Before.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            mod[mod.get_global_var(gvar.name_hint)] = func
    return mod


def test_updates_write_over_the_tensors_they_replace():
    tvm.ir.assert_structural_equal(InPlaceUpdates()(Before), _with_kernels_of_before(Expected))


def _injective_update():
    mod = tvm.IRModule(dict(Before.functions.items()))
    mod[mod.get_global_var("sgd")] = Before["sgd"].with_attr("op_pattern", 2)
    return mod


@pytest.mark.parametrize("make", [_injective_update, lambda: _with_kernels_of_before(BeforeLateRead)], ids=["injective-update", "old-value-read-later"])
def test_an_update_stays_out_of_place_where_in_place_would_change_a_value(make):
    # an injective kernel (a transpose) reads other elements than it writes; a later kernel reading
    # the old weight would see the new one. Only the step counter is written in place.
    after = InPlaceUpdates()(make())
    assert int(after["train_step"].attrs["pock_tvm.in_place"]) == 1
    new_w = next(b for b in after["train_step"].body.blocks[0].bindings if b.var.name == "new_w")
    assert isinstance(new_w.value, tvm.relax.Call) and new_w.value.op.name == "relax.builtin.alloc_tensor"
