"""FoldFrozenKernels: kernels of constants become constants, the same bytes as TVM's FoldConstant,
each computed once per process (the memo); what it must leave alone stays."""

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from pock_tvm.passes import FoldFrozenKernels
from pock_tvm.passes.fold_frozen_kernels import FoldMemo

W = np.arange(6, dtype="float32").reshape(2, 3)


def _before(w=W):
    @I.ir_module
    class Before:
        @R.function
        def forward(x: R.Tensor((4, 3), "float32"), b: R.Tensor((2,), "float32")):
            with R.dataflow():
                wt = R.permute_dims(R.const(w), [1, 0])  # frozen weight, transposed
                scaled = R.multiply(wt, R.const(2.0, "float32"))  # and scaled: a chain of constants
                t = R.matmul(x, scaled)
                y = R.add(t, b)
                R.output(y)
            return y

    return relax.transform.LegalizeOps()(Before)


def _expected(w=W):
    @I.ir_module
    class Expected:
        @R.function
        def forward(x: R.Tensor((4, 3), "float32"), b: R.Tensor((2,), "float32")):
            with R.dataflow():
                t = R.matmul(x, R.const(2 * w.T))
                y = R.add(t, b)
                R.output(y)
            return y

    return relax.transform.LegalizeOps()(Expected)


def _relax(mod):
    """The module without the kernels nothing calls (folding leaves them; the pipeline's DCE removes them)."""
    return relax.transform.DeadCodeElimination(["forward"])(mod)


def test_a_chain_of_constant_kernels_becomes_one_constant():
    after = FoldFrozenKernels(FoldMemo())(_before())
    tvm.ir.assert_structural_equal(_relax(after), _relax(_expected()))


def test_the_same_bytes_as_tvms_fold_constant():
    ours = FoldFrozenKernels(FoldMemo())(_before())
    tvms = relax.transform.FoldConstant()(_before())
    tvm.ir.assert_structural_equal(_relax(ours), _relax(tvms))


def test_a_second_compile_computes_nothing_again_and_other_weights_are_other_results():
    memo = FoldMemo()
    FoldFrozenKernels(memo)(_before())
    assert (memo.hits, memo.misses) == (0, 2)
    again = FoldFrozenKernels(memo)(_before())
    assert (memo.hits, memo.misses) == (2, 2)
    tvm.ir.assert_structural_equal(_relax(again), _relax(_expected()))
    other = W + 1  # same kernels, other frozen weight: computed, never the remembered result
    folded = FoldFrozenKernels(memo)(_before(other))
    assert memo.misses == 4
    tvm.ir.assert_structural_equal(_relax(folded), _relax(_expected(other)))


def test_the_memo_is_bounded():
    memo = FoldMemo(result_bytes=W.nbytes)  # room for one result
    FoldFrozenKernels(memo)(_before())
    assert memo.held <= W.nbytes and len(memo.results) == 1


def test_kernels_of_inputs_and_of_nothing_stay():
    @I.ir_module
    class Before:
        @R.function
        def forward(x: R.Tensor((4, 3), "float32")):
            with R.dataflow():
                z = R.zeros((4, 3), "float32")  # no input: would only become a large constant
                y = R.add(x, z)
                R.output(y)
            return y

    before = relax.transform.LegalizeOps()(Before)
    assert FoldFrozenKernels(FoldMemo())(before).same_as(before)
