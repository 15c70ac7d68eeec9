"""FoldBatchNorm: a frozen conv+BN pair becomes one conv with a folded weight and shift."""

import numpy as np
import torch
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

import pock_tvm
from pock_tvm.options import PipelineOptions
from pock_tvm.analysis.layers import bindings
from pock_tvm.models import SmallCNN
from pock_tvm.passes import BindFrozenParams, FoldBatchNorm
from graphs import training_graph
from helpers import assert_setting_keeps_numbers

rng = np.random.default_rng(0)
W = rng.standard_normal((4, 2, 3, 3)).astype("float32")
G, B, M = (rng.standard_normal(4).astype("float32") for _ in range(3))
V = rng.uniform(0.5, 2.0, 4).astype("float32")
S = G / np.sqrt(V + 1e-5)


def _before(beta_trained: bool):
    @I.ir_module
    class Before:
        @R.function
        def forward(x: R.Tensor((1, 2, 5, 5), "float32"), w: R.Tensor((4, 2, 3, 3), "float32"),
                    g: R.Tensor((4,), "float32"), b: R.Tensor((4,), "float32"),
                    m: R.Tensor((4,), "float32"), v: R.Tensor((4,), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
                t = R.nn.batch_norm(c, g, b, m, v, axis=1, epsilon=1e-5)
                y = t[0]
                R.output(y)
            return y

    frozen = {"w": W, "g": G, "m": M, "v": V, **({} if beta_trained else {"b": B})}
    return BindFrozenParams(frozen, ["b"] if beta_trained else [])(Before)


def test_frozen_conv_bn_becomes_conv_plus_constant_shift():
    after = FoldBatchNorm()(_before(beta_trained=False))
    shift = (B - M * S).reshape(1, 4, 1, 1)

    @I.ir_module
    class Expected:
        @R.function
        def forward(x: R.Tensor((1, 2, 5, 5), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, R.const(W * S.reshape(4, 1, 1, 1)), padding=[1, 1, 1, 1])
                y = R.add(c, R.const(shift))
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(after, Expected)


def test_trained_shift_stays_a_variable():
    after = FoldBatchNorm()(_before(beta_trained=True))
    ops = [b.value.op.name for b in bindings(after["forward"]) if hasattr(b.value, "op")]
    assert ops == ["relax.nn.conv2d", "relax.subtract", "relax.reshape", "relax.add"]
    assert [p.name for p in after["forward"].params] == ["x", "b"]


def test_folded_matches_batch_norm_numerically():
    x = rng.standard_normal((1, 2, 5, 5)).astype("float32")
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(W), padding=1)
    want = torch.nn.functional.batch_norm(conv, *(torch.from_numpy(a) for a in (M, V, G, B)), eps=1e-5)
    mod = FoldBatchNorm()(_before(beta_trained=False))
    exe = tvm.compile(mod, target="llvm")
    got = tvm.relax.VirtualMachine(exe, tvm.cpu())["forward"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_bn_whose_conv_is_trained_is_not_folded(small_cnn):
    mod, _ = training_graph(small_cnn, "full", options=PipelineOptions(), frozen_values={})
    assert not any(isinstance(p, tvm.ir.expr.Constant) for b in bindings(mod["forward"])
                   for p in getattr(b.value, "args", []) if getattr(b.value, "op", None) is not None
                   and getattr(b.value.op, "name", "") == "relax.nn.conv2d")


def test_folding_keeps_the_numbers():
    torch.manual_seed(0)
    assert_setting_keeps_numbers(SmallCNN(), torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,)),
                                 pock_tvm.SGD(lr=0.1, momentum=0.9), "bias-only", "fold_frozen", rtol=1e-5)


Q = rng.integers(-127, 128, (4, 2, 3, 3)).astype("int8")
QS = rng.uniform(0.01, 0.02, 4).astype("float32")


def test_int8_weight_keeps_its_integers_and_takes_the_bn_scale():
    @I.ir_module
    class Before:
        @R.function
        def forward(x: R.Tensor((1, 2, 5, 5), "float32")):
            with R.dataflow():
                w = R.dequantize(R.const(Q), R.const(QS), R.const(0, "int8"), axis=0, out_dtype="float32")
                c = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
                t = R.nn.batch_norm(c, R.const(G), R.const(B), R.const(M), R.const(V), axis=1, epsilon=1e-5)
                y = t[0]
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def forward(x: R.Tensor((1, 2, 5, 5), "float32")):
            with R.dataflow():
                w_dq = R.dequantize(R.const(Q), R.const(QS * S), R.const(0, "int8"), axis=0, out_dtype="float32")
                c = R.nn.conv2d(x, w_dq, padding=[1, 1, 1, 1])
                y = R.add(c, R.const((B - M * S).reshape(1, 4, 1, 1)))
                R.output(y)
            return y

    after = relax_dce(FoldBatchNorm()(Before))
    tvm.ir.assert_structural_equal(after, Expected)


def relax_dce(mod):
    return tvm.relax.transform.DeadCodeElimination(["forward"])(mod)
