"""ScheduleForGPU: every kernel of a training step gets GPU thread bindings; no GPU needed."""

import pytest
import tvm

from pock_tvm.passes import ScheduleForGPU
from pock_tvm.passes.pipeline import pock_tvm_pipeline
from graphs import training_graph

TARGET = tvm.target.Target({"kind": "cuda", "arch": "sm_87", "host": {"kind": "llvm"}})


def test_every_kernel_is_bound_to_gpu_threads(small_cnn):
    mod, _ = training_graph(small_cnn, "last-2")
    with TARGET:
        lowered = pock_tvm_pipeline(build_training_graph=False, lower=True, gpu=True)(mod)
    kernels = [(gv.name_hint, f) for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) > 10
    for name, func in kernels:
        assert func.attrs["tirx.is_scheduled"], name
        assert "threadIdx.x" in func.script(), name


def test_a_kernel_no_rule_schedules_is_named():
    with TARGET, pytest.raises(ValueError, match=r"ScheduleForGPU: no GPU schedule rule applies to kernel main"):
        ScheduleForGPU(rules=[])(_one_kernel())


def _one_kernel():
    from tvm import relax, te

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([8], "float32"))
    with bb.function("f", [x]):
        bb.emit_func_output(bb.emit_te(lambda a: te.compute((8,), lambda i: a[i] * 2.0, name="double"), x,
                                       primfunc_name_hint="main"))
    return bb.get()
