"""CheckIndices: each index a kernel reads memory at is checked where it is used; a wrong one is a
clear error in Python and in the runner, before any parameter changes."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.script import ir as I, relax as Rs

import pock_tvm
from pock_tvm.passes import CheckIndices
from pock_tvm.passes.check_indices import index_check_kernel


@I.ir_module
class Before:
    @Rs.function
    def main(ids: Rs.Tensor((2, 3), "int64"), table: Rs.Tensor((20, 4), "float32"),
             log_p: Rs.Tensor((6, 5), "float32"), labels: Rs.Tensor((6,), "int64")):
        with Rs.dataflow():
            shifted = Rs.add(ids, Rs.const(1, "int64"))
            rows = Rs.take(table, shifted, axis=0)
            again = Rs.take(table, shifted, axis=0)  # same indices, same bound: one check
            fixed = Rs.take(table, Rs.const(np.array([0, 19]), "int64"), axis=0)  # a constant: none
            loss = Rs.nn.nll_loss(log_p, labels, reduction="mean", ignore_index=-100)
            Rs.output(rows, again, fixed, loss)
        return (rows, again, fixed, loss)


def _expected():
    bb = relax.BlockBuilder()
    ids = relax.Var("ids", relax.TensorType((2, 3), "int64"))
    table = relax.Var("table", relax.TensorType((20, 4), "float32"))
    log_p = relax.Var("log_p", relax.TensorType((6, 5), "float32"))
    labels = relax.Var("labels", relax.TensorType((6,), "int64"))
    take_msg = ("pock_tvm: index out of range in take from 'table' (20 rows along the axis): an index computed "
                "from the input(s) ids lies outside [0, 20); check the inputs' values (token ids below the "
                "vocabulary, attention masks of 0 and 1)")
    loss_msg = ("pock_tvm: index out of range in the loss over 5 classes: an index computed from the input(s) "
                "labels lies outside [0, 5) or -100 (ignored); fix the labels")
    with bb.function("main", [ids, table, log_p, labels]):
        check_take = bb.add_func(index_check_kernel((2, 3), "int64", 20, None, take_msg), "check_index")
        check_loss = bb.add_func(index_check_kernel((6,), "int64", 5, -100, loss_msg), "check_index")
        with bb.dataflow():
            shifted = bb.emit(relax.op.add(ids, relax.const(1, "int64")), "shifted")
            checked = bb.emit(relax.call_tir(check_take, (shifted,), relax.TensorType((2, 3), "int64")))
            rows = bb.emit_output(relax.op.take(table, checked, axis=0), "rows")
            again = bb.emit_output(relax.op.take(table, checked, axis=0), "again")
            fixed = bb.emit_output(relax.op.take(table, relax.const(np.array([0, 19]), "int64"), axis=0), "fixed")
            checked_labels = bb.emit(relax.call_tir(check_loss, (labels,), relax.TensorType((6,), "int64")))
            loss = bb.emit_output(relax.op.nn.nll_loss(log_p, checked_labels, reduction="mean", ignore_index=-100),
                                  "loss")
        bb.emit_func_output(relax.Tuple([rows, again, fixed, loss]))
    return bb.get()


def test_each_index_is_checked_once_before_its_use_and_constants_are_not():
    after = CheckIndices({"table": "table"})(Before)
    tvm.ir.assert_structural_equal(after["main"], _expected()["main"], map_free_vars=True)
    kernels = [f for f in after.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 2


@pytest.mark.parametrize("extra", [None, -100])
def test_the_check_kernel_copies_good_indices_and_raises_on_the_first_bad_one(extra):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, 4), "int64"))
    with bb.function("main", [x]):
        kernel = bb.add_func(index_check_kernel((3, 4), "int64", 7, extra, "pock_tvm: index out of range here"), "k")
        with bb.dataflow():
            out = bb.emit_output(relax.call_tir(kernel, (x,), relax.TensorType((3, 4), "int64")))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), "llvm"), tvm.cpu())
    good = np.arange(12).reshape(3, 4) % 7
    if extra is not None:
        good[1, 1] = extra
    assert np.array_equal(vm["main"](tvm.runtime.tensor(good)).numpy(), good)
    for bad in (7, -1, 10 ** 12) + (() if extra is None else (extra - 1,)):
        wrong = good.copy()
        wrong[2, 3] = bad
        with pytest.raises(Exception, match="pock_tvm: index out of range here"):
            vm["main"](tvm.runtime.tensor(wrong))


class _Shifted(torch.nn.Module):
    """``emb(ids + 1)``: the input's bound (50) lets 49 through, and 49 + 1 is outside the table."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids + 1).mean(1))


def test_an_index_computed_in_the_graph_is_refused_like_torch_and_nothing_changes():
    torch.manual_seed(0)
    model = _Shifted()
    program = pock_tvm.compile(model, (torch.zeros(2, 5, dtype=torch.int64),), scheme="full")
    ids, y = np.random.default_rng(0).integers(0, 40, (2, 5)), np.array([0, 1])
    before = {k: v.copy() for k, v in program.state_dict().items()}
    for bad in (49, -2, 10 ** 9):
        wrong = ids.copy()
        wrong[1, 2] = bad
        with pytest.raises(IndexError):
            model(torch.from_numpy(wrong))
        with pytest.raises(ValueError, match=r"step: pock_tvm: index out of range in take from 'emb.weight' "
                                             r"\(50 rows along the axis\): an index computed from the input\(s\) ids"):
            program.step(wrong, y)
        with pytest.raises(ValueError, match=r"predict: pock_tvm: index out of range"):
            program.predict(wrong)
    after = program.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(program.predict(ids), expected, rtol=1e-5, atol=1e-6)
