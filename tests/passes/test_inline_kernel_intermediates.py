"""InlineKernelIntermediates: fused kernels keep only reduction results as scratch buffers."""

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
