"""SplitPartialChannels: structure (Before/Expected) and numerics (the split forward is exact)."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from pock_tvm.passes import SplitPartialChannels


@I.ir_module
class Before:
    @R.function
    def forward(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((6, 4, 3, 3), "float32"),
                dw: R.Tensor((6, 1, 3, 3), "float32"), fc: R.Tensor((3, 6), "float32")):
        with R.dataflow():
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            d = R.nn.conv2d(y, dw, padding=[1, 1, 1, 1], groups=6)
            p = R.mean(d, axis=[2, 3])
            wt = R.permute_dims(fc, axes=[1, 0])
            z = R.matmul(p, wt)
            R.output(z)
        return z


@I.ir_module
class Expected:
    @R.function
    def forward(x: R.Tensor((1, 4, 8, 8), "float32"), w__upd: R.Tensor((6, 1, 3, 3), "float32"),
                w__frz: R.Tensor((6, 3, 3, 3), "float32"), dw__upd: R.Tensor((2, 1, 3, 3), "float32"),
                dw__frz: R.Tensor((4, 1, 3, 3), "float32"), fc__upd: R.Tensor((3, 2), "float32"),
                fc__frz: R.Tensor((3, 4), "float32")):
        R.func_attr({"pock_tvm.partial": {"dw": [0, 2], "fc": [1, 2], "w": [1, 1]}})
        with R.dataflow():
            xs = R.split(x, indices_or_sections=[1], axis=1)
            xa = xs[0]
            xb = xs[1]
            ya = R.nn.conv2d(xa, w__upd, padding=[1, 1, 1, 1])
            yb = R.nn.conv2d(xb, w__frz, padding=[1, 1, 1, 1])
            y = R.add(ya, yb)
            ys = R.split(y, indices_or_sections=[2], axis=1)
            ysa = ys[0]
            ysb = ys[1]
            da = R.nn.conv2d(ysa, dw__upd, padding=[1, 1, 1, 1], groups=2)
            db = R.nn.conv2d(ysb, dw__frz, padding=[1, 1, 1, 1], groups=4)
            d = R.concat([da, db], axis=1)
            p = R.mean(d, axis=[2, 3])
            ps = R.split(p, indices_or_sections=[2], axis=1)
            pa = ps[0]
            pb = ps[1]
            wta = R.permute_dims(fc__upd, axes=[1, 0])
            za = R.matmul(pa, wta)
            wtb = R.permute_dims(fc__frz, axes=[1, 0])
            zb = R.matmul(pb, wtb)
            z = R.add(za, zb)
            R.output(z)
        return z


SPLITS = {"w": (1, 1), "dw": (0, 2), "fc": (1, 2)}


def test_structure():
    after = SplitPartialChannels(SPLITS)(Before)
    tvm.ir.assert_structural_equal(after["forward"], Expected["forward"])


def test_no_partial_is_identity():
    tvm.ir.assert_structural_equal(SplitPartialChannels({})(Before), Before)


def test_split_forward_is_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype("float32")
    w = rng.standard_normal((6, 4, 3, 3)).astype("float32")
    dw = rng.standard_normal((6, 1, 3, 3)).astype("float32")
    fc = rng.standard_normal((3, 6)).astype("float32")
    target = tvm.target.Target({"kind": "llvm"})

    def run(mod, *args):
        vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
        return vm["forward"](*[tvm.runtime.tensor(a) for a in args]).numpy()

    full = run(Before, x, w, dw, fc)
    split = run(SplitPartialChannels(SPLITS)(Before), x, w[:, :1], w[:, 1:], dw[:2], dw[2:],
                fc[:, :2], fc[:, 2:])
    np.testing.assert_allclose(split, full, rtol=1e-5, atol=1e-5)


def test_weight_read_by_other_op_is_an_error():
    @I.ir_module
    class Odd:
        @R.function
        def forward(x: R.Tensor((4,), "float32"), w: R.Tensor((4,), "float32")):
            with R.dataflow():
                y = R.add(x, w)
                R.output(y)
            return y

    with pytest.raises(ValueError, match="SplitPartialChannels: relax.add reads a partially updated"):
        SplitPartialChannels({"w": (0, 2)})(Odd)


SCALE = np.linspace(0.5, 1.5, 6).astype("float32")


@I.ir_module
class Scaled:  # int8 weights trained in integer units: read as multiply(W, per-output-channel unit)
    @R.function
    def forward(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((6, 4, 3, 3), "float32"),
                dw: R.Tensor((6, 1, 3, 3), "float32")):
        with R.dataflow():
            ws = R.multiply(w, R.const(SCALE.reshape(6, 1, 1, 1)))
            y = R.nn.conv2d(x, ws, padding=[1, 1, 1, 1])
            dws = R.multiply(dw, R.const(SCALE.reshape(6, 1, 1, 1)))
            d = R.nn.conv2d(y, dws, padding=[1, 1, 1, 1], groups=6)
            R.output(d)
        return d


def test_scaled_weights_split_with_their_part_of_the_scale():
    after = SplitPartialChannels({"w": (1, 1), "dw": (0, 2)})(Scaled)
    muls = [b.value for block in after["forward"].body.blocks for b in block.bindings
            if getattr(getattr(b.value, "op", None), "name", "") == "relax.multiply"]
    shapes = [tuple(int(d) for d in m.args[1].ty.shape) for m in muls]
    assert shapes == [(6, 1, 1, 1), (6, 1, 1, 1), (2, 1, 1, 1), (4, 1, 1, 1)]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype("float32")
    w = rng.standard_normal((6, 4, 3, 3)).astype("float32")
    dw = rng.standard_normal((6, 1, 3, 3)).astype("float32")
    target = tvm.target.Target({"kind": "llvm"})

    def run(mod, *args):
        vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
        return vm["forward"](*[tvm.runtime.tensor(a) for a in args]).numpy()

    np.testing.assert_allclose(run(after, x, w[:, :1], w[:, 1:], dw[:2], dw[2:]), run(Scaled, x, w, dw),
                               rtol=1e-5, atol=1e-5)
