"""SplitFrozenPrefix: the frozen prefix of train_step as its own function, and a step from its output."""

import tvm
from tvm.script import ir as I, relax as R

from pock_tvm.passes import SplitFrozenPrefix
from pock_tvm.passes.split_frozen_prefix import DECLINED_ATTR

F32 = "float32"
ATTRS = {"pock_tvm.trainable": ["w"], "pock_tvm.state_names": []}


# -- Before/Expected: relu(x) is frozen work; its transpose is redone in the step, not cached twice

@I.ir_module
class Before:
    @R.function
    def train_step(x: R.Tensor((2, 4), F32), w: R.Tensor((4, 4), F32), target: R.Tensor((2, 4), F32),
                   lr: R.Tensor((), F32), step: R.Tensor((), F32)):
        R.func_attr(ATTRS)
        with R.dataflow():
            h = R.nn.relu(x)
            t = R.permute_dims(h, axes=[1, 0])
            y = R.matmul(h, w)
            d = R.subtract(y, target)
            loss = R.sum(R.multiply(d, d))
            g = R.matmul(t, d)
            new_w = R.subtract(w, R.multiply(lr, g))
            next_step = R.add(step, R.const(1, F32))
            out = (loss, new_w, next_step)
            R.output(out)
        return out


@I.ir_module
class Expected:  # added beside train_step, which stays as it was
    @R.function
    def prefix(x: R.Tensor((2, 4), F32), w: R.Tensor((4, 4), F32)):
        R.func_attr({"global_symbol": "prefix"})
        with R.dataflow():
            h = R.nn.relu(x)
            cached = (h,)
            R.output(cached)
        return cached

    @R.function
    def train_step_cached(cached0: R.Tensor((2, 4), F32), w: R.Tensor((4, 4), F32), target: R.Tensor((2, 4), F32),
                          lr: R.Tensor((), F32), step: R.Tensor((), F32)):
        R.func_attr({"pock_tvm.trainable": ["w"], "pock_tvm.state_names": [], "global_symbol": "train_step_cached"})
        with R.dataflow():
            t = R.permute_dims(cached0, axes=[1, 0])
            y = R.matmul(cached0, w)
            d = R.subtract(y, target)
            loss = R.sum(R.multiply(d, d))
            g = R.matmul(t, d)
            new_w = R.subtract(w, R.multiply(lr, g))
            next_step = R.add(step, R.const(1, F32))
            out = (loss, new_w, next_step)
            result = out
            R.output(result)
        return result


def test_before_expected():
    after = SplitFrozenPrefix(1)(Before)
    tvm.ir.assert_structural_equal(after["train_step"], Before["train_step"])
    for name in ("prefix", "train_step_cached"):
        tvm.ir.assert_structural_equal(after[name], Expected[name], map_free_vars=True)


# -- nothing to cache: the first op reads the trained weight

@I.ir_module
class TrainedFirst:
    @R.function
    def train_step(x: R.Tensor((2, 4), F32), w: R.Tensor((4, 4), F32), target: R.Tensor((2, 4), F32),
                   lr: R.Tensor((), F32), step: R.Tensor((), F32)):
        R.func_attr(ATTRS)
        with R.dataflow():
            t = R.permute_dims(x, axes=[1, 0])
            y = R.matmul(x, w)
            d = R.subtract(y, target)
            loss = R.sum(R.multiply(d, d))
            g = R.matmul(t, d)
            new_w = R.subtract(w, R.multiply(lr, g))
            next_step = R.add(step, R.const(1, F32))
            out = (loss, new_w, next_step)
            R.output(out)
        return out


def test_nothing_to_cache_is_declined_with_the_reason():
    after = SplitFrozenPrefix(1)(TrainedFirst)
    assert [g.name_hint for g in after.get_global_vars()] == ["train_step"]
    assert "nothing to cache" in str(after.attrs[DECLINED_ATTR])


# -- a cached tensor must be batch-major: its first axis a multiple of the batch

@I.ir_module
class BatchSum:
    @R.function
    def train_step(x: R.Tensor((2, 3), F32), w: R.Tensor((3, 3), F32), target: R.Tensor((3,), F32),
                   lr: R.Tensor((), F32), step: R.Tensor((), F32)):
        R.func_attr(ATTRS)
        with R.dataflow():
            s = R.sum(R.nn.relu(x), axis=[0])
            y = R.matmul(w, s)
            d = R.subtract(y, target)
            loss = R.sum(R.multiply(d, d))
            g = R.matmul(R.expand_dims(d, axis=[1]), R.expand_dims(s, axis=[0]))
            new_w = R.subtract(w, R.multiply(lr, g))
            next_step = R.add(step, R.const(1, F32))
            out = (loss, new_w, next_step)
            R.output(out)
        return out


def test_a_tensor_that_is_not_batch_major_is_declined():
    """(A sum over the batch whose length happens to be a multiple of the batch passes this shape
    check; the prefix cache checks the numbers when it is filled: tests/training.)"""
    after = SplitFrozenPrefix(1)(BatchSum)
    assert [g.name_hint for g in after.get_global_vars()] == ["train_step"]
    assert "not batch-major" in str(after.attrs[DECLINED_ATTR])


def test_needs_the_single_block_of_reorder_updates():
    import pytest

    from tvm import relax

    func = relax.transform.ToNonDataflow()(Before)["train_step"]
    body = relax.SeqExpr([*func.body.blocks, relax.BindingBlock([])], func.body.body)
    split = tvm.IRModule({"train_step": relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)})
    with pytest.raises(ValueError, match="after ReorderUpdates"):
        SplitFrozenPrefix(1)(split)
