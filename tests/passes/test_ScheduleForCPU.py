"""ScheduleForCPU: parallel outer loops and vector inner loops, by rule; numbers never change."""

import torch
import tvm
from tvm import relax, s_tir, te

import pock_tvm
from graphs import training_graph
from helpers import assert_setting_keeps_numbers
from pock_tvm.models import SmallCNN
from pock_tvm.passes import ScheduleForCPU
from pock_tvm.passes.pipeline import pock_tvm_pipeline


def _kernel(compute, *shapes):
    bb = relax.BlockBuilder()
    args = [relax.Var(f"a{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    with bb.function("f", args):
        bb.emit_func_output(bb.emit_te(compute, *args, primfunc_name_hint="main"))
    return bb.get()


def _prim(mod):
    return next(f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc))


def _expected(mod, schedule):
    sch = s_tir.Schedule(_prim(mod))
    schedule(sch)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def test_elementwise_kernel_is_fused_parallel_and_vectorized():
    before = _kernel(lambda a: te.compute((64, 512), lambda i, j: a[i, j] * 2.0, name="double"), (64, 512))

    def schedule(sch):
        block = sch.get_sblock("double")
        outer, inner = sch.split(sch.fuse(*sch.get_loops(block)), [None, 16])
        sch.parallel(outer)
        sch.vectorize(inner)

    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), _expected(before, schedule))


def test_small_elementwise_kernel_is_vectorized_but_not_parallel():
    before = _kernel(lambda a: te.compute((4, 4), lambda i, j: a[i, j] + 1.0, name="inc"), (4, 4))

    def schedule(sch):
        sch.vectorize(sch.fuse(*sch.get_loops(sch.get_sblock("inc"))))

    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), _expected(before, schedule))


def _matmul(a, b):
    k = te.reduce_axis((0, 256), name="k")
    return te.compute((64, 96), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="matmul")


def test_reduction_vectorizes_the_inner_spatial_loop_below_the_reduction():
    before = _kernel(_matmul, (64, 256), (256, 96))

    def schedule(sch):
        block = sch.get_sblock("matmul")
        i, j, k = sch.get_loops(block)
        jo, ji = sch.split(j, [None, 16])
        sch.reorder(k, ji)
        sch.parallel(sch.fuse(i, jo))
        sch.vectorize(ji)
        init = sch.decompose_reduction(block, k)
        sch.vectorize(sch.get_loops(init)[-1])

    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), _expected(before, schedule))


def test_short_reduction_keeps_its_order_and_is_only_parallel():
    def window(a):
        r = te.reduce_axis((0, 3), name="r")
        return te.compute((256, 126), lambda i, j: te.sum(a[i, j + r], axis=r), name="window")

    before = _kernel(window, (256, 128))

    def schedule(sch):
        i, j, _ = sch.get_loops(sch.get_sblock("window"))
        sch.parallel(sch.fuse(i, j))

    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), _expected(before, schedule))


def test_every_kernel_of_a_training_step_is_scheduled_and_numbers_do_not_change(small_cnn):
    mod, _ = training_graph(small_cnn, "full")
    with tvm.target.Target({"kind": "llvm"}):
        lowered = pock_tvm_pipeline(build_training_graph=False)(mod)
    kernels = {gv.name_hint: f for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    unscheduled = sorted(n for n, f in kernels.items() if "tirx.is_scheduled" not in f.attrs)
    # kernels without spatial work: a scalar loss, its gradient seed
    assert len(unscheduled) <= 3, unscheduled
    assert sum("T.vectorized" in f.script() for f in kernels.values()) > len(kernels) // 2
    torch.manual_seed(0)
    assert_setting_keeps_numbers(SmallCNN(), torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,)),
                                 pock_tvm.SGD(lr=0.1, momentum=0.9), "full", "schedule_kernels", rtol=1e-5)


def test_a_kernel_written_as_plain_loops_keeps_them():
    from tvm.script import tirx as T

    @T.prim_func
    def plain(a: T.Buffer((8,), "float32")):
        for i in range(8):
            a[i] = a[i] + T.float32(1.0)

    mod = tvm.IRModule({"plain": plain})
    tvm.ir.assert_structural_equal(ScheduleForCPU()(mod), mod)
