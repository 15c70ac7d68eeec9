"""InlineKernelIntermediates: fused kernels keep only reduction results as scratch buffers."""

import numpy as np
import torch

import pock_tvm
from pock_tvm.options import PipelineOptions
from pock_tvm.analysis.memory import kernel_workspace
from pock_tvm.models import SmallCNN
from pock_tvm.passes.pipeline import pock_tvm_pipeline
from graphs import training_graph
from helpers import assert_setting_keeps_numbers


def _lowered(imported, inline):
    # schedules off: their own scratch (a transposed weight copy, partial sums) is not this pass's subject
    mod, _ = training_graph(imported, "full")
    return pock_tvm_pipeline(build_training_graph=False,
                             options=PipelineOptions(inline_intermediates=inline, schedule_kernels=False))(mod)


def test_only_reduction_results_stay_in_scratch(small_cnn):
    on, off = _lowered(small_cnn, True), _lowered(small_cnn, False)
    # batch 2, first conv: 8 x 8 x 8 output; off: padded input + conv + BN stages, on: the conv sum
    assert kernel_workspace(on)["peak"] < kernel_workspace(off)["peak"] / 2
    for func in on.functions.values():
        if hasattr(func, "body") and hasattr(func.body, "block"):
            for buf in func.body.block.alloc_buffers:
                assert not buf.name.startswith(("pad", "T_add", "T_multiply", "T_subtract")), buf.name


def test_inlining_keeps_the_numbers():
    torch.manual_seed(0)
    assert_setting_keeps_numbers(SmallCNN(), torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,)),
                                 pock_tvm.SGD(lr=0.1), "full", "inline_intermediates")


# -- a row's math (rsqrt of its mean square) read broadcast by the whole row stays a stage

import tvm  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from pock_tvm.passes import InlineKernelIntermediates  # noqa: E402


@tvm.script.ir_module
class RowNorm:
    @T.prim_func(private=True, s_tir=True)
    def main(x: T.Buffer((4, 8), "float32"), out: T.Buffer((4, 8), "float32")):
        total = T.sblock_alloc_buffer((4,))
        shifted = T.sblock_alloc_buffer((4,))
        scale = T.sblock_alloc_buffer((4,))
        for i, k in T.grid(4, 8):
            with T.sblock("total"):
                vi, vk = T.axis.remap("SR", [i, k])
                with T.init():
                    total[vi] = T.float32(0)
                total[vi] = total[vi] + x[vi, vk] * x[vi, vk]
        for i in range(4):
            with T.sblock("shifted"):
                vi = T.axis.remap("S", [i])
                shifted[vi] = total[vi] + T.float32(1e-5)
        for i in range(4):
            with T.sblock("scale"):
                vi = T.axis.remap("S", [i])
                scale[vi] = T.rsqrt(shifted[vi])
        for i, j in T.grid(4, 8):
            with T.sblock("out"):
                vi, vj = T.axis.remap("SS", [i, j])
                out[vi, vj] = x[vi, vj] * scale[vi]


def _blocks(func) -> list[str]:
    names = []
    for line in func.script().splitlines():
        if "T.sblock(" in line and not line.strip().startswith("#"):
            names.append(line.split('T.sblock("')[1].split('"')[0])
    return names


def test_math_read_broadcast_is_kept_once_per_row():
    after = InlineKernelIntermediates()(RowNorm)["main"]
    # the cheap add is inlined into the rsqrt stage; the rsqrt is not recomputed for each of 8 columns
    assert _blocks(after) == ["total", "scale", "out"]
    x = np.random.default_rng(0).standard_normal((4, 8)).astype("float32")
    lib = tvm.compile(tvm.IRModule({"main": after.with_attr("global_symbol", "main")}), target="llvm")
    out = tvm.runtime.empty((4, 8), "float32")
    lib["main"](tvm.runtime.tensor(x), out)
    np.testing.assert_allclose(out.numpy(), x / np.sqrt((x * x).sum(1, keepdims=True) + 1e-5), rtol=1e-5)
