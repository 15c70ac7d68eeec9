"""The host target: LLVM's tuning for AMD Zen 4/5 miscompiles a kernel of the pipeline (the rotary
embedding's rotate-half gradient, its pads inlined), so those CPUs compile for the generic x86-64-v4
with their own features. The kernel is checked here against plain LLVM for each such CPU."""

import numpy as np
import pytest
import tvm
from tvm import s_tir, te

from pock_tvm.analysis.kernel_check import compare
from pock_tvm.passes.inline_kernel_intermediates import InlineKernelIntermediates
from pock_tvm.targets import load_target
from pock_tvm.targets import toolchain
from pock_tvm.targets.toolchain import GENERIC_TUNING, native_cpu, system_cpu_features, tvm_target


def test_a_miscompiling_cpu_is_tuned_generically_with_its_own_features():
    zen5 = native_cpu("znver5")
    assert zen5["mcpu"] == "x86-64-v4"
    assert {"+avx512f", "+avx512vnni", "+avx512bf16", "+avx512vbmi"} <= set(zen5["mattr"])
    assert native_cpu("sapphirerapids") == {"mcpu": "sapphirerapids"}
    assert native_cpu("cortex-a72") == {"mcpu": "cortex-a72"}


def test_the_host_preset_uses_it(monkeypatch):
    monkeypatch.setattr(toolchain, "system_cpu", lambda: "znver4")
    target = tvm_target(load_target("host"))
    assert str(target.attrs["mcpu"]) == "x86-64-v4" and "+avx512f" in [str(f) for f in target.attrs["mattr"]]
    monkeypatch.setattr(toolchain, "system_cpu", lambda: "skylake")
    assert str(tvm_target(load_target("host")).attrs["mcpu"]) == "skylake"


def rotate_half_gradient() -> tvm.tirx.PrimFunc:
    """What FuseTIR makes of a Llama attention's q (or k) gradient through its rotary embedding:
    ``d x = d y * cos + rotate_half^T(d y * sin)`` (split, negate, two pads, add), then transpose
    and reshape back to the projection's output: one stage per line."""
    adjoint = te.placeholder((2, 2, 1, 12, 8), name="adjoint")
    cos, sin = te.placeholder((1, 1, 12, 8), name="cos"), te.placeholder((1, 1, 12, 8), name="sin")
    squeezed = te.compute((2, 2, 12, 8), lambda i, j, k, m: adjoint[i, j, 0, k, m], name="squeeze")
    scaled = te.compute((2, 2, 12, 8), lambda i, j, k, m: squeezed[i, j, k, m] * sin[0, 0, k, m], name="times_sin")
    first = te.compute((2, 2, 12, 4), lambda i, j, k, m: scaled[i, j, k, m], name="split_first")
    second = te.compute((2, 2, 12, 4), lambda i, j, k, m: scaled[i, j, k, m + 4], name="split_second")
    negated = te.compute((2, 2, 12, 4), lambda i, j, k, m: first[i, j, k, m] * -1.0, name="negate")
    pad_a = te.compute((2, 2, 12, 8), lambda i, j, k, m: tvm.tirx.if_then_else(
        tvm.tirx.all(4 <= m, m < 8), negated[i, j, k, m - 4], 0.0), name="pad_a")
    pad_b = te.compute((2, 2, 12, 8), lambda i, j, k, m: tvm.tirx.if_then_else(
        tvm.tirx.all(0 <= m, m < 4), second[i, j, k, m], 0.0), name="pad_b")
    rotated = te.compute((2, 2, 12, 8), lambda *i: pad_a[i] + pad_b[i], name="add_pads")
    direct = te.compute((2, 2, 12, 8), lambda i, j, k, m: squeezed[i, j, k, m] * cos[0, 0, k, m], name="times_cos")
    total = te.compute((2, 2, 12, 8), lambda *i: rotated[i] + direct[i], name="add")
    moved = te.compute((2, 12, 2, 8), lambda i, j, k, m: total[i, k, j, m], name="transpose")
    out = te.compute((24, 16), lambda i, j: moved[i // 12, i % 12, j // 8, j % 8], name="reshape")
    return te.create_prim_func([adjoint, cos, sin, out]).with_attr("tirx.noalias", True)


def _inlined():
    """The kernel as the pipeline compiles it: every stage inlined into the last one."""
    func = InlineKernelIntermediates()(tvm.IRModule({"main": rotate_half_gradient()}))["main"]
    sch = s_tir.Schedule(func)
    assert len(sch.get_child_blocks(sch.get_sblock("root"))) == 1
    return func


needs_avx512 = pytest.mark.skipif("avx512f" not in system_cpu_features(),
                                  reason="the Zen 4/5 code needs AVX-512 to run here")


@needs_avx512
@pytest.mark.parametrize("cpu", sorted(GENERIC_TUNING))
def test_the_inlined_rotary_gradient_is_right_when_compiled_for_a_zen_cpu(cpu):
    plain, inlined = rotate_half_gradient(), _inlined()
    ours = compare("rotate_half", plain, inlined, tvm.target.Target({"kind": "llvm", **native_cpu(cpu)}))
    assert ours is not None and ours.ok, ours
    # and LLVM's own tuning for that CPU gets it wrong (the reason for GENERIC_TUNING; when a TVM
    # upgrade makes this fail, the workaround can go)
    theirs = compare("rotate_half", plain, inlined, tvm.target.Target({"kind": "llvm", "mcpu": cpu}))
    assert theirs is not None and not theirs.ok and np.isfinite(ours.error)
