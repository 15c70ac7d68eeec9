"""AccurateSums: long float32 sums accumulate in float64; short ones and other dtypes are kept."""

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.script import ir as I, relax as Rs

from pock_tvm.passes import AccurateSums


def test_a_long_sum_accumulates_in_float64_and_a_short_one_is_kept():
    @I.ir_module
    class Before:
        @Rs.function
        def main(x: Rs.Tensor((2, 8, 32, 32), "float32"), y: Rs.Tensor((4, 8), "float32")):
            with Rs.dataflow():
                bias_grad = Rs.sum(x, axis=[0, 2, 3], keepdims=False)  # 2048 terms per output
                short = Rs.sum(y, axis=[1], keepdims=False)  # 8 terms
                collapsed = Rs.collapse_sum_to(x, Rs.shape([1, 8, 1, 1]))
                Rs.output(bias_grad, short, collapsed)
            return (bias_grad, short, collapsed)

    @I.ir_module
    class Expected:
        @Rs.function
        def main(x: Rs.Tensor((2, 8, 32, 32), "float32"), y: Rs.Tensor((4, 8), "float32")):
            with Rs.dataflow():
                bias_grad = Rs.astype(Rs.sum(Rs.astype(x, "float64"), axis=[0, 2, 3], keepdims=False), "float32")
                short = Rs.sum(y, axis=[1], keepdims=False)
                collapsed = Rs.astype(Rs.collapse_sum_to(Rs.astype(x, "float64"), Rs.shape([1, 8, 1, 1])),
                                      "float32")
                Rs.output(bias_grad, short, collapsed)
            return (bias_grad, short, collapsed)

    after = AccurateSums()(Before)
    expected = relax.transform.Normalize()(Expected)
    tvm.ir.assert_structural_equal(relax.transform.Normalize()(after), expected)


def test_a_cancelling_bias_gradient_over_a_224x224_map_matches_float64():
    # terms of +-1000 that cancel to ~1: a float32 accumulator is off by ~1e-2 of the result
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 4, 224, 224)) * 1000).astype("float32")
    x -= x.mean(axis=(0, 2, 3), keepdims=True).astype("float32")
    x[:, :, 0, 0] += 1.0
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.sum(xv, axis=[0, 2, 3]))
        bb.emit_func_output(out)
    want = torch.tensor(x, dtype=torch.float64).sum((0, 2, 3)).numpy()
    results = {}
    for name, mod in (("plain", bb.get()), ("accurate", AccurateSums()(bb.get()))):
        exe = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
        results[name] = relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    error = {k: float(np.abs(v - want).max() / np.abs(want).max()) for k, v in results.items()}
    assert error["accurate"] < 1e-6 and error["plain"] > 1e-4, error
