"""FreezeBatchNorm: eval-mode BN becomes arithmetic on fixed statistics; train-mode BN is refused."""

import pytest
from tvm.script import ir as I
from tvm.script import relax as R

from graphs import backward_calls  # noqa: F401  (keeps tests/ importable the same way everywhere)
from pock_tvm.analysis.layers import bindings
from pock_tvm.passes import FreezeBatchNorm


def _module(training: bool):
    @I.ir_module
    class Mod:
        @R.function
        def forward(x: R.Tensor((2, 4, 3, 3), "float32"), g: R.Tensor((4,), "float32"),
                    b: R.Tensor((4,), "float32"), m: R.Tensor((4,), "float32"), v: R.Tensor((4,), "float32")):
            with R.dataflow():
                t = R.nn.batch_norm(x, g, b, m, v, axis=1, training=training)
                y = t[0]
                R.output(y)
            return y

    return Mod


def test_eval_batch_norm_is_decomposed():
    after = FreezeBatchNorm()(_module(False))
    ops = [b.value.op.name for b in bindings(after["forward"]) if hasattr(b.value, "op")]
    assert "relax.nn.batch_norm" not in ops
    assert {"relax.subtract", "relax.multiply", "relax.add"} <= set(ops)
    assert [p.name for p in after["forward"].params] == ["x", "g", "b", "m", "v"]


def test_train_mode_batch_norm_is_an_error():
    with pytest.raises(ValueError, match=r"FreezeBatchNorm: .*training=True.*model.eval\(\)"):
        FreezeBatchNorm()(_module(True))


def test_eval_batch_norm_becomes_the_affine_map_of_its_running_statistics():
    """(x - mean) / sqrt(var + eps) * gamma + beta, per channel; the statistics pass through."""
    import tvm

    @I.ir_module
    class Expected:
        @R.function
        def forward(x: R.Tensor((2, 4, 3, 3), "float32"), g: R.Tensor((4,), "float32"),
                    b: R.Tensor((4,), "float32"), m: R.Tensor((4,), "float32"), v: R.Tensor((4,), "float32")):
            with R.dataflow():
                centred = R.subtract(x, R.expand_dims(m, axis=[0, 2, 3]))
                std = R.sqrt(R.add(R.expand_dims(v, axis=[0, 2, 3]), R.const(1e-5, "float32")))
                scaled = R.multiply(R.divide(centred, std), R.expand_dims(g, axis=[0, 2, 3]))
                out = R.add(scaled, R.expand_dims(b, axis=[0, 2, 3]))
                t = (out, m, v)
                y = t[0]
                R.output(y)
            return y

    after = FreezeBatchNorm()(_module(False))
    tvm.ir.assert_structural_equal(after["forward"], tvm.relax.transform.Normalize()(Expected)["forward"])
