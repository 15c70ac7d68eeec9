"""AddLoRA: a low-rank path beside a linear weight, adapters appended to the parameters."""

import numpy as np
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from pock_tvm.passes.add_lora import AddLoRA, Adapter


@I.ir_module
class Before:
    @R.function
    def forward(x: R.Tensor((2, 5, 4), "float32"), w: R.Tensor((3, 4), "float32"),
                v: R.Tensor((3, 3), "float32")):
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            h = R.matmul(x, wt)
            vt = R.permute_dims(v, axes=[1, 0])
            y = R.matmul(h, vt)
            R.output(y)
        return y


@I.ir_module
class Expected:
    @R.function
    def forward(x: R.Tensor((2, 5, 4), "float32"), w: R.Tensor((3, 4), "float32"),
                v: R.Tensor((3, 3), "float32"), w_lora_A: R.Tensor((2, 4), "float32"),
                w_lora_B: R.Tensor((3, 2), "float32")):
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            lora_base = R.matmul(x, wt)
            lora_down = R.matmul(x, R.permute_dims(w_lora_A, axes=[1, 0]))
            lora_up = R.matmul(lora_down, R.permute_dims(w_lora_B, axes=[1, 0]))
            h = R.add(lora_base, R.multiply(lora_up, R.const(4.0, "float32")))
            vt = R.permute_dims(v, axes=[1, 0])
            y = R.matmul(h, vt)
            R.output(y)
        return y


ADAPTER = {"w": Adapter("w_lora_A", "w_lora_B", 2, 4.0)}


def test_adapter_beside_the_chosen_weight_only():
    tvm.ir.assert_structural_equal(AddLoRA(ADAPTER)(Before), Expected)


def test_numbers_are_x_wt_plus_scaled_low_rank_path():
    rng = np.random.default_rng(0)
    x, w, v, a, b = (rng.standard_normal(s).astype("float32") for s in ((2, 5, 4), (3, 4), (3, 3), (2, 4), (3, 2)))
    exe = tvm.compile(AddLoRA(ADAPTER)(Before), target=tvm.target.Target({"kind": "llvm"}))
    out = tvm.relax.VirtualMachine(exe, tvm.cpu())["forward"](*map(tvm.runtime.tensor, (x, w, v, a, b))).numpy()
    np.testing.assert_allclose(out, (x @ w.T + 4.0 * (x @ a.T) @ b.T) @ v.T, rtol=1e-5, atol=1e-5)


@I.ir_module
class NotLinear:
    @R.function
    def forward(x: R.Tensor((3, 4), "float32"), w: R.Tensor((3, 4), "float32")):
        with R.dataflow():
            y = R.add(x, w)
            R.output(y)
        return y


def test_errors_name_the_weight():
    with pytest.raises(ValueError, match=r"AddLoRA: relax.add reads w directly; LoRA adapts linear layers"):
        AddLoRA(ADAPTER)(NotLinear)
    with pytest.raises(ValueError, match=r"AddLoRA: \['u'\] are not parameters of forward"):
        AddLoRA({"u": ADAPTER["w"]})(Before)
