"""ScheduleForCPU: parallel outer loops and vector inner loops, by rule; numbers never change."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, s_tir, te

import pock_tvm
from graphs import training_graph
from helpers import assert_setting_keeps_numbers
from pock_tvm.models import SmallCNN
from pock_tvm.analysis.kernel_check import RULES_ATTR
from pock_tvm.passes import ScheduleForCPU
from pock_tvm.passes.pipeline import pock_tvm_pipeline


def _kernel(compute, *shapes):
    bb = relax.BlockBuilder()
    args = [relax.Var(f"a{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    with bb.function("f", args):
        bb.emit_func_output(bb.emit_te(compute, *args, primfunc_name_hint="main"))
    return bb.get()


def _prim(mod):
    """The module's kernel, without the names of the rules that scheduled it (tested apart)."""
    func = next(f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    return func.without_attr(RULES_ATTR) if func.attrs and RULES_ATTR in func.attrs else func


def _expected(mod, schedule):
    sch = s_tir.Schedule(_prim(mod))
    schedule(sch)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def test_elementwise_kernel_is_split_by_a_vector_below_its_outermost_loop_and_parallel():
    # a 3x3 conv weight's SGD update: the inner loops fused are split by the vector, the outermost
    # stays apart (all four fused, the index of every lane is computed apart: measured 4x slower)
    before = _kernel(lambda a: te.compute((64, 32, 3, 3), lambda *i: a[i] * 2.0, name="double"), (64, 32, 3, 3))

    def schedule(sch):
        block = sch.get_sblock("double")
        head, *inner_loops = sch.get_loops(block)
        outer, inner = sch.split(sch.fuse(*inner_loops), [None, 16])
        sch.parallel(sch.fuse(head, outer))
        sch.vectorize(inner)

    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), _expected(before, schedule))


def test_elementwise_kernel_with_short_inner_loops_is_fused_whole():
    before = _kernel(lambda a: te.compute((8192, 3), lambda i, j: a[i, j] * 2.0, name="double"), (8192, 3))

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
    k = te.reduce_axis((0, a.shape[1]), name="k")
    return te.compute((a.shape[0], b.shape[1]), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="matmul")


def test_reduction_gets_a_register_tile_over_a_loop_the_primary_input_does_not_use():
    # a1 (256x96) is the primary input (the largest, following j) and does not depend on i: 8 rows of i share each vector of a1
    before = _kernel(_matmul, (64, 256), (256, 96))
    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), _expected(before, _wide_tile))


def _wide_tile(sch, name="matmul"):
    return _register_tiled_matmul(sch, name, vectors=3, unroll_k=True)


def _register_tiled_matmul(sch, name="matmul", lanes=16, rows=8, vectors=1, unroll_k=False):
    """The register-tile rule on a matmul-shaped block (rows x ``vectors`` vectors of ``lanes``; the
    reduction unrolled by 2 when ``unroll_k``); returns the parallel loop."""
    block = sch.get_sblock(name)
    i, j, k = sch.get_loops(block)
    io, ii = sch.split(i, [None, rows])
    jo, ji, jv, ks = *_vector_row(sch, j, lanes, vectors), _reduction(sch, k, unroll_k)
    sch.reorder(io, jo, *ks, ii, *jv, ji)
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, jo)
    sch.vectorize(sch.get_loops(write_back)[-1])
    parallel = sch.fuse(io, jo)
    sch.parallel(parallel)
    for loop in (ii, *jv, *ks[1:]):
        sch.unroll(loop)
    sch.vectorize(ji)
    sch.vectorize(sch.get_loops(sch.decompose_reduction(block, ks[0]))[-1])
    return parallel


def _vector_row(sch, j, lanes, vectors):
    """``(outer, vector loop, [loop over the vectors of a tile row] or [])``."""
    jo, ji = sch.split(j, [None, lanes * vectors])
    if vectors == 1:
        return jo, ji, []
    jv, ji = sch.split(ji, [vectors, lanes])
    return jo, ji, [jv]


def _reduction(sch, k, unroll_k):
    """``[k]``, or ``[outer, inner of 2]`` when the tile unrolls the reduction by two."""
    return list(sch.split(k, [None, 2])) if unroll_k else [k]


def _pointwise_weight_gradient(x, dy):
    # a 1x1 conv's weight gradient over 4x4 maps at batch 1 (activations stored channels-last): a
    # reduction of 16, just above a 3x3 window
    r = te.reduce_axis((0, 16), name="r")
    return te.compute((48, 28), lambda f, c: te.sum(x[r, c] * dy[f, r], axis=r), name="grad")


def test_reduction_longer_than_a_3x3_window_gets_the_register_tile():
    before = _kernel(_pointwise_weight_gradient, (16, 28), (48, 16))
    expected = _expected(before, lambda sch: _register_tiled_matmul(sch, "grad", lanes=4))
    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), expected)


def test_reduction_shorter_than_a_window_gets_the_register_tile_where_inputs_are_reused():
    # a 1x1 conv of 8 input channels (MobileNetV2's first expansion) as a matmul: a reduction of 8;
    # 8 rows of i share each vector of b (a depthwise window, with no such reuse, keeps its order)
    before = _kernel(_matmul, (64, 8), (8, 96))
    expected = _expected(before, lambda sch: _register_tiled_matmul(sch, vectors=3))  # (8: no unrolled reduction)
    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), expected)


def _channel_weight_gradient(x, dy):
    # a 1x1 conv's weight gradient over 4x4 maps at batch 8: the output's inner loop (14 input
    # channels) moves an outer dimension of x, so a vector of outputs would gather x
    rc, ry, rx = (te.reduce_axis((0, e), name=k) for e, k in ((8, "rc"), (4, "ry"), (4, "rx")))
    return te.compute((336, 14), lambda f, c: te.sum(x[rc, c, ry, rx] * dy[rc, f, ry, rx], axis=[rc, ry, rx]),
                      name="grad")


def test_vector_of_outputs_that_would_gather_through_an_outer_dimension_gets_no_register_tile():
    before = _kernel(_channel_weight_gradient, (8, 14, 4, 4), (8, 336, 4, 4))

    def schedule(sch):
        block = sch.get_sblock("grad")
        f, c, rc, ry, rx = sch.get_loops(block)
        sch.reorder(f, rc, ry, rx, c)
        sch.parallel(f)
        sch.vectorize(c)
        sch.vectorize(sch.get_loops(sch.decompose_reduction(block, rc))[-1])

    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), _expected(before, schedule))


def _matmul_relu(a, b):
    m = _matmul(a, b)
    return te.compute(m.shape, lambda i, j: te.max(m[i, j], 0.0), name="relu")


def test_elementwise_epilogue_runs_inside_its_producers_parallel_loop():
    # the fused tail (ReLU here; an optimizer update after a weight gradient) works on the tile each
    # parallel iteration just wrote, vectorized along the output's contiguous run (a tile row of 48
    # of a 96 row, in vectors of 16)
    before = _kernel(_matmul_relu, (64, 256), (256, 96))

    def schedule(sch):
        parallel = _wide_tile(sch)
        relu = sch.get_sblock("relu")
        sch.reverse_compute_at(relu, parallel)
        sch.vectorize(sch.split(sch.get_loops(relu)[-1], [None, 16])[1])

    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), _expected(before, schedule))


def _weight_gradient_update(x, dy):
    # a 3x3 conv's weight gradient over 2x2 maps at batch 1 (input given padded), then SGD
    ry, rx = te.reduce_axis((0, 2), name="ry"), te.reduce_axis((0, 2), name="rx")
    grad = te.compute((48, 32, 3, 3), lambda f, c, ky, kx: te.sum(x[0, c, ry + ky, rx + kx] * dy[0, f, ry, rx],
                                                                  axis=[ry, rx]), name="grad")
    return te.compute(grad.shape, lambda *i: 0.5 - 0.1 * grad[i], name="update")


def _weight_gradient_update_reference(x, dy):
    windows = np.lib.stride_tricks.sliding_window_view(x[0], (2, 2), axis=(1, 2))  # c, ky, kx, ry, rx
    return 0.5 - 0.1 * np.einsum("cyxrs,frs->fcyx", windows, dy[0])


def _strided_conv(x, w):
    c, ry, rx = (te.reduce_axis((0, e), name=n) for e, n in ((3, "c"), (3, "ry"), (3, "rx")))
    return te.compute((1, 16, 16, 16), lambda n, f, y, i: te.sum(x[n, c, 2 * y + ry, 2 * i + rx] * w[f, c, ry, rx],
                                                                 axis=[c, ry, rx]), name="conv")


def test_strided_conv_vectorizes_output_channels_over_a_transposed_copy_of_the_weights():
    # a row of outputs reads every other input column (a gather): the vector runs over channels instead
    before = _kernel(_strided_conv, (1, 3, 33, 33), (16, 3, 3, 3))

    def schedule(sch):
        block = sch.get_sblock("conv")
        n, f, y, i, c, ry, rx = sch.get_loops(block)
        sch.reorder(n, y, c, ry, rx, i, f)  # the tile: a whole row of 16 outputs x 16 channels
        _accumulate_channels_innermost(sch, block, y, lambda n, f, y, i: (n, y, i, f))
        _transposed_copy(sch, block, 1, lambda f, c, h, w: (c, h, w, f))
        sch.parallel(sch.fuse(n, y))
        sch.unroll(i)
        sch.vectorize(f)
        sch.vectorize(sch.get_loops(sch.decompose_reduction(block, c))[-1])

    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), _expected(before, schedule))


def _conv3x3(batch, size):
    """A 3x3 conv of 64 channels over ``size`` x ``size`` maps (input given padded)."""
    def compute(x, w):
        c, ry, rx = (te.reduce_axis((0, e), name=n) for e, n in ((64, "c"), (3, "ry"), (3, "rx")))
        return te.compute((batch, 64, size, size), lambda n, f, y, i: te.sum(
            x[n, c, y + ry, i + rx] * w[f, c, ry, rx], axis=[c, ry, rx]), name="conv")
    return compute, [(batch, 64, size + 2, size + 2), (64, 64, 3, 3)]


def _accumulate_channels_innermost(sch, block, at, layout):
    """The local accumulators, with the vector's dimension innermost (each vector one register)."""
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, at)
    sch.transform_layout(block, ("write", 0), layout)
    sch.vectorize(sch.get_loops(write_back)[-1])


def _transposed_copy(sch, block, read, layout, parallel=False, lanes=None):
    """The copy of input ``read`` with the vector's dimension (its first here) innermost, written
    contiguously: the other dimensions outside (parallel when large), that one vectorized."""
    copy = sch.cache_read(block, read, "global")
    sch.transform_layout(copy, ("write", 0), layout)
    first, *others = sch.get_loops(copy)
    sch.reorder(*others, first)
    if parallel:
        sch.parallel(sch.fuse(*others))
    sch.vectorize(sch.split(first, [None, lanes])[1] if lanes else first)


def _channel_vectorized(vector_loop, copied, layout, parallel_copy):
    # 4 outputs per row: the tile takes in the row above (y and i fused), up to 16 accumulators
    def schedule(sch):
        block = sch.get_sblock("conv")
        n, f, y, i, c, ry, rx = sch.get_loops(block)
        pixels = sch.fuse(y, i)
        if vector_loop == "f":
            fo, fi = sch.split(f, [None, 16])
            outer, group, vector, local = [n, fo], [], fi, (lambda n, f, y, i: (n, y, i, f))
        else:  # one vector of the batch (8) x 4 pixels: 4 output channels make the tile 16 vectors
            fo, fi = sch.split(f, [None, 4])
            outer, group, vector, local = [fo], [fi], n, (lambda n, f, y, i: (f, y, i, n))
        sch.reorder(*outer, c, ry, rx, *group, pixels, vector)
        _accumulate_channels_innermost(sch, block, outer[-1], local)
        _transposed_copy(sch, block, copied, layout, parallel_copy, 16 if parallel_copy else None)
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        for loop in group:
            sch.unroll(loop)
        sch.unroll(pixels)
        sch.vectorize(vector)
        sch.vectorize(sch.get_loops(sch.decompose_reduction(block, c))[-1])
    return schedule


def test_deep_conv_at_batch_1_vectorizes_output_channels_although_its_weights_are_the_largest_input():
    # 4x4 maps: the weights (64x64x3x3) outweigh the activations, yet each weight is used 16 times:
    # the activations stay the data input, the vector runs over output channels of copied weights
    compute, shapes = _conv3x3(1, 4)
    before = _kernel(compute, *shapes)
    expected = _expected(before, _channel_vectorized("f", 1, lambda f, c, h, w: (c, h, w, f), True))
    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), expected)


def test_conv_with_large_weights_at_batch_8_vectorizes_the_batch_over_copied_activations():
    # 2x2 maps at batch 8: copying the activations (8x64x4x4) costs less than the weights (64x64x3x3)
    compute, shapes = _conv3x3(8, 2)
    before = _kernel(compute, *shapes)
    expected = _expected(before, _channel_vectorized("n", 0, lambda n, c, h, w: (c, h, w, n), False))
    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), expected)


def _strided_input_gradient(dy, w):
    """The input gradient of a stride-2 1x1 conv (64 -> 32 channels): every other output row and
    column reads dy, by parity (an index TVM cannot write as a stride)."""
    k = te.reduce_axis((0, 64), name="k")
    return te.compute((2, 32, 8, 8), lambda n, c, y, i: te.sum(te.if_then_else(
        te.all(y % 2 == 0, i % 2 == 0), dy[n, k, y // 2, i // 2], 0.0) * w[k, c], axis=k), name="dx")


def _strided_input_gradient_reference(dy, w):
    dx = np.zeros((2, 32, 8, 8))
    dx[:, :, ::2, ::2] = np.einsum("nkyx,kc->ncyx", dy, w)
    return dx


def test_input_gradient_of_a_strided_conv_vectorizes_channels_not_the_gathered_row():
    func = _prim(ScheduleForCPU()(_kernel(_strided_input_gradient, (2, 64, 4, 4), (64, 32))))
    script = func.script()
    assert "a1_global" in script  # the weights copied with the output channels innermost
    assert "T.vectorized(T.int64(16))" in script  # 16 of the 32 channels per vector


def test_weights_used_fewer_than_min_reuse_times_are_streamed_not_copied():
    # 2x2 maps at batch 1: each weight is used 4 times, a transposed copy would cost more than it saves
    compute, shapes = _conv3x3(1, 2)
    script = _prim(ScheduleForCPU()(_kernel(compute, *shapes))).script()
    assert "T.vectorized" in script
    assert "_global" not in script  # no cache_read copy of either input


def test_reduction_without_a_shared_input_vectorizes_the_output_row_below_the_reduction():
    before = _kernel(_plane_sum, (32, 64, 96))

    def schedule(sch):
        block = sch.get_sblock("plane_sum")
        i, j, k = sch.get_loops(block)
        jo, ji = sch.split(j, [None, 16])
        sch.reorder(i, jo, k, ji)
        sch.parallel(sch.fuse(i, jo))
        sch.vectorize(ji)
        sch.vectorize(sch.get_loops(sch.decompose_reduction(block, k))[-1])

    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), _expected(before, schedule))


def test_long_reduction_along_the_inputs_rows_is_vectorized_as_partial_sums():
    # a bias gradient: short output, the reduction runs along the input's contiguous rows
    before = _kernel(_row_sum, (8, 2048))

    def schedule(sch):
        block = sch.get_sblock("row_sum")
        i, k = sch.get_loops(block)
        _, lane = sch.split(k, [None, 16])
        partial = sch.rfactor(lane, factor_axis=0)
        i, ko, lane = sch.get_loops(partial)
        sch.reorder(i, ko, lane)
        write_back = sch.cache_write(partial, 0, "local")
        sch.reverse_compute_at(write_back, i)
        sch.transform_layout(partial, ("write", 0), lambda lane, i: (i, lane))  # an output's lanes: one register
        sch.parallel(i)
        sch.vectorize(lane)
        sch.vectorize(sch.get_loops(sch.decompose_reduction(partial, ko))[-1])

    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), _expected(before, schedule))


def _depthwise_weight_gradient(x, dy):
    n, y, i = (te.reduce_axis((0, e), name=k) for e, k in ((2, "n"), (32, "y"), (32, "i")))
    return te.compute((16, 3, 3), lambda c, ky, kx: te.sum(x[n, c, y + ky, i + kx] * dy[n, c, y, i],
                                                           axis=[n, y, i]), name="dw")


def _depthwise_weight_gradient_reference(x, dy):
    return np.stack([np.stack([np.einsum("ncyx,ncyx->c", x[:, :, ky:ky + 32, kx:kx + 32], dy)
                               for kx in range(3)], -1) for ky in range(3)], 1)


def test_depthwise_weight_gradient_tiles_its_window_over_partial_sums_of_the_shared_gradient():
    # every output of the 3x3 window reads dy at the same place: one vector of dy feeds 9 accumulators
    before = _kernel(_depthwise_weight_gradient, (2, 16, 34, 34), (2, 16, 32, 32))

    def schedule(sch):
        block = sch.get_sblock("dw")
        c, ky, kx, n, y, i = sch.get_loops(block)
        _, lane = sch.split(sch.fuse(y, i), [None, 16])
        partial = sch.rfactor(lane, factor_axis=0)
        c, ky, kx, n, run, lane = sch.get_loops(partial)
        window = sch.fuse(ky, kx)
        sch.reorder(c, n, run, window, lane)
        write_back = sch.cache_write(partial, 0, "local")
        sch.reverse_compute_at(write_back, c)
        sch.transform_layout(partial, ("write", 0), lambda lane, c, ky, kx: (c, ky, kx, lane))
        sch.parallel(c)
        sch.unroll(window)
        sch.vectorize(lane)
        sch.vectorize(sch.get_loops(sch.decompose_reduction(partial, n))[-1])

    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), _expected(before, schedule))


def _conv_weight_gradient_24(x, dy):
    n, y, i = (te.reduce_axis((0, e), name=k) for e, k in ((2, "n"), (24, "y"), (24, "i")))
    return te.compute((16, 16, 3, 3), lambda f, c, ky, kx: te.sum(x[n, c, y + ky, i + kx] * dy[n, f, y, i],
                                                                  axis=[n, y, i]), name="dw")


def _conv_weight_gradient_24_reference(x, dy):
    return np.stack([np.stack([np.einsum("ncyx,nfyx->fc", x[:, :, ky:ky + 24, kx:kx + 24], dy)
                               for kx in range(3)], -1) for ky in range(3)], -2)


def test_weight_gradient_over_rows_a_vector_would_straddle_vectorizes_channels_instead():
    # 24-wide rows fused and cut in 16 lanes: each vector crosses a row, its loads become gathers
    # (a DigitsCNN weight gradient ran at 7 GFLOP/s as partial sums, 99 over channels)
    after = ScheduleForCPU()(_kernel(_conv_weight_gradient_24, (2, 16, 26, 26), (2, 16, 24, 24)))
    func = next(f for f in after.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    assert str(func.attrs[RULES_ATTR]) == "channel_vectorized"


def _plane_sum(a):
    k = te.reduce_axis((0, 64), name="k")
    return te.compute((32, 96), lambda i, j: te.sum(a[i, k, j], axis=k), name="plane_sum")


def _depthwise(x, w):
    ry, rx = te.reduce_axis((0, 3), name="ry"), te.reduce_axis((0, 3), name="rx")
    return te.compute((2, 32, 8, 8), lambda n, c, y, i: te.sum(x[n, c, y + ry, i + rx] * w[c, ry, rx], axis=[ry, rx]),
                      name="depthwise")


def _pointwise_13x13(x, w):
    c = te.reduce_axis((0, 32), name="c")
    return te.compute((1, 8, 13, 13), lambda n, f, y, i: te.sum(x[n, c, y, i] * w[f, c], axis=c), name="pointwise")


def _row_sum(a):
    k = te.reduce_axis((0, 2048), name="k")
    return te.compute((8,), lambda i: te.sum(a[i, k], axis=k), name="row_sum")


@pytest.mark.parametrize("compute, shapes, reference", [
    (_matmul, [(64, 256), (256, 96)], lambda a, b: a @ b),
    (_plane_sum, [(32, 64, 96)], lambda a: a.sum(1)),
    (_row_sum, [(8, 2048)], lambda a: a.sum(1)),
    (_strided_conv, [(1, 3, 33, 33), (16, 3, 3, 3)], lambda x, w: torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w), stride=2).numpy()),
    (_depthwise, [(2, 32, 10, 10), (32, 3, 3)], lambda x, w: torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w)[:, None], groups=32).numpy()),
    (_pointwise_13x13, [(1, 32, 13, 13), (8, 32)], lambda x, w: np.einsum("ncyx,fc->nfyx", x, w)),
    (*_conv3x3(1, 4), lambda x, w: torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w)).numpy()),
    (*_conv3x3(8, 2), lambda x, w: torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w)).numpy()),
    (*_conv3x3(1, 2), lambda x, w: torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w)).numpy()),
    (*_conv3x3(4, 2), lambda x, w: torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w)).numpy()),
    (_strided_input_gradient, [(2, 64, 4, 4), (64, 32)], _strided_input_gradient_reference),
    (_depthwise_weight_gradient, [(2, 16, 34, 34), (2, 16, 32, 32)], _depthwise_weight_gradient_reference),
    (_matmul_relu, [(64, 256), (256, 96)], lambda a, b: np.maximum(a @ b, 0)),
    (_matmul, [(64, 8), (8, 96)], lambda a, b: a @ b),
    (_channel_weight_gradient, [(8, 14, 4, 4), (8, 336, 4, 4)], lambda x, dy: np.einsum("rcyx,rfyx->fc", x, dy)),
    (_pointwise_weight_gradient, [(16, 28), (48, 16)], lambda x, dy: dy @ x),
    (_weight_gradient_update, [(1, 32, 4, 4), (1, 48, 2, 2)], _weight_gradient_update_reference),
    (_conv_weight_gradient_24, [(2, 16, 26, 26), (2, 16, 24, 24)], _conv_weight_gradient_24_reference),
], ids=["register-tile", "plain", "partial-sums", "channel-vector", "small-window", "rows-no-vector-width",
        "channel-vector-deep", "batch-vector", "streamed-weights", "channel-vector-groups", "parity-gather",
        "window-partial-sums", "epilogue", "short-register-tile", "outer-gather", "weight-gradient-epilogue", "short-weight-gradient",
        "straddling-rows"])
def test_each_reduction_rule_keeps_the_numbers(compute, shapes, reference):
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(s).astype("float32") for s in shapes]
    expected = reference(*[x.astype("float64") for x in inputs])
    func = _prim(ScheduleForCPU()(_kernel(compute, *shapes)))
    assert "T.vectorized" in func.script()
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target({"kind": "llvm"})).jit()
    out = tvm.runtime.empty(expected.shape, "float32")
    lib["main"](*[tvm.runtime.tensor(x) for x in inputs], out)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_small_window_over_small_maps_is_unrolled_below_a_vector_of_two_rows():
    before = _kernel(_depthwise, (2, 32, 10, 10), (32, 3, 3))

    def schedule(sch):
        block = sch.get_sblock("depthwise")
        n, c, y, i, ry, rx = sch.get_loops(block)
        head, vector = sch.split(sch.fuse(y, i), [None, 16])
        sch.reorder(n, c, head, ry, rx, vector)
        sch.parallel(sch.fuse(n, c))
        sch.unroll(ry)
        sch.unroll(rx)
        sch.vectorize(vector)
        sch.vectorize(sch.get_loops(sch.decompose_reduction(block, ry))[-1])

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


def _packed(sch, name="matmul", rows=8, lanes=16, vectors=2, streamed=False):
    """The register tile (rows x ``vectors`` vectors, the reduction unrolled by 2) with the right
    operand copied into panels ``[N / width, K, width]`` of a tile row's width: the whole operand
    before the kernel, or (``streamed``) each panel inside the loop over panels, with that loop
    outermost and parallel and the rows' loop inside it."""
    block = sch.get_sblock(name)
    i, j, k = sch.get_loops(block)
    width = lanes * vectors
    io, ii = sch.split(i, [None, rows])
    jo, ji, jv = _vector_row(sch, j, lanes, vectors)
    ks = _reduction(sch, k, True)
    outer = [jo, io] if streamed else [io, jo]
    sch.reorder(*outer, *ks, ii, *jv, ji)
    copy = sch.cache_read(block, 1, "global")
    sch.transform_layout(copy, ("write", 0), tvm.tirx.IndexMap.from_func(
        lambda a, b: [b // width, a, b % width], ndim=2))
    if streamed:
        sch.compute_at(copy, jo)
        sch.vectorize(sch.get_loops(copy)[-1])
    else:
        ck, cn = sch.get_loops(copy)
        head, lane = sch.split(cn, [None, width])
        sch.reorder(head, ck, lane)
        sch.parallel(head)
        sch.vectorize(lane)
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, outer[-1])
    sch.vectorize(sch.get_loops(write_back)[-1])
    sch.parallel(jo if streamed else sch.fuse(io, jo))
    for loop in (ii, *jv, ks[1]):
        sch.unroll(loop)
    sch.vectorize(ji)
    sch.vectorize(sch.get_loops(sch.decompose_reduction(block, ks[0]))[-1])


def test_right_operand_with_long_rows_is_packed_into_panels_first():
    # b's rows are 4 KiB: each step of k would jump a page; packed, a tile walks one contiguous panel
    # (1024 = 32 x 32: rows of 2 vectors, 48 does not divide it)
    before = _kernel(_matmul, (64, 128), (128, 1024))
    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), _expected(before, _packed))


def test_streamed_right_operand_is_packed_one_panel_at_a_time_under_the_loop_over_panels():
    # b (2 MiB) does not stay in cache: the loop over its panels is outermost, each panel is copied
    # once (32 KiB of scratch, not a copy of b) and used by every row tile
    before = _kernel(_matmul, (64, 512), (512, 1024))
    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)),
                                   _expected(before, lambda sch: _packed(sch, streamed=True)))


def test_a_long_streamed_panel_is_walked_in_blocks_that_stay_in_cache():
    # b (9 MiB, rows of 576) is streamed panel by panel; a panel is 4096 x 48 floats (768 KiB):
    # every row tile would read it from memory. Blocks of 256 rows (48 KiB) are copied and used by
    # both row tiles, which accumulate in the output across blocks (an LM head's input gradient:
    # 70 -> 120 GFLOP/s)
    before = _kernel(_matmul, (16, 4096), (4096, 576))

    def schedule(sch):
        block = sch.get_sblock("matmul")
        i, j, k = sch.get_loops(block)
        io, ii = sch.split(i, [None, 8])
        jo, ji, jv = _vector_row(sch, j, 16, 3)
        kb, k = sch.split(k, [None, 256])
        k, ku = sch.split(k, [None, 2])
        sch.reorder(jo, kb, io, k, ku, ii, *jv, ji)
        copy = sch.cache_read(block, 1, "global")
        sch.transform_layout(copy, ("write", 0), tvm.tirx.IndexMap.from_func(
            lambda a, b: [b // 48, a, b % 48], ndim=2))
        sch.compute_at(copy, kb)
        sch.vectorize(sch.get_loops(copy)[-1])
        sch.parallel(jo)
        for loop in (ii, *jv, ku):
            sch.unroll(loop)
        sch.vectorize(ji)
        sch.vectorize(sch.get_loops(sch.decompose_reduction(block, kb))[-1])

    tvm.ir.assert_structural_equal(_prim(ScheduleForCPU()(before)), _expected(before, schedule))


@pytest.mark.parametrize("mcpu, rows, vectors", [("haswell", 4, 1), ("skylake-avx512", 8, 3)])
def test_register_tile_rows_fit_the_targets_vector_registers(mcpu, rows, vectors):
    # 16 lanes of float32: two AVX2 registers a row (16 registers: 4 rows x 1 vector), one AVX-512
    # register (32: 8 rows x 3 vectors = 24 accumulators, the reduction unrolled by 2)
    before = _kernel(_matmul, (64, 256), (256, 96))
    with tvm.target.Target({"kind": "llvm", "mcpu": mcpu}):
        scheduled = _prim(ScheduleForCPU()(before))
    expected = _expected(before, lambda sch: _register_tiled_matmul(sch, rows=rows, vectors=vectors,
                                                                    unroll_k=vectors > 1))
    tvm.ir.assert_structural_equal(scheduled, expected)


@pytest.mark.parametrize("shape", [(64, 128, 1024), (64, 512, 1024), (16, 4096, 576)])
def test_packed_matmuls_keep_their_numbers(shape):
    m, k, n = shape
    before = _kernel(_matmul, (m, k), (k, n))
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k)).astype("float32"), rng.standard_normal((k, n)).astype("float32")
    exe = tvm.compile(ScheduleForCPU()(before), target=tvm.target.Target({"kind": "llvm"}))
    out = relax.VirtualMachine(exe, tvm.cpu())["f"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    np.testing.assert_allclose(out, a @ b, rtol=1e-4, atol=1e-3)


def test_a_register_tile_that_covers_the_whole_output_needs_no_outer_loop():
    """A 10-wide column sum over 32 rows (a bias gradient): one register tile is the whole output.
    The rule raised IndexError on it (and the kernel fell back to the plain rule)."""
    from tvm.script import tirx as T

    from pock_tvm.analysis.kernel_check import compare
    from pock_tvm.passes import ScheduleForCPU
    from pock_tvm.targets import load_target
    from pock_tvm.targets.toolchain import tvm_target

    @T.prim_func(private=True, s_tir=True)
    def column_sum(a: T.Buffer((32, 10), "float32"), out: T.Buffer((10,), "float32")):
        for j, k in T.grid(10, 32):
            with T.sblock("red"):
                vj, vk = T.axis.remap("SR", [j, k])
                with T.init():
                    out[vj] = T.float32(0)
                out[vj] = out[vj] + a[vk, vj]

    target = tvm_target(load_target("host"))
    with target:
        scheduled = ScheduleForCPU().schedule(column_sum)
    assert scheduled is not None and "register_tiled" in str(scheduled.attrs["pock_tvm.schedule_rules"])
    check = compare("column_sum", column_sum, scheduled, target)
    assert check is not None and check.ok, check.describe() if check else "not run"


def test_a_kernel_of_bool_masks_is_not_vectorized_and_builds():
    """A causal mask ANDed with a padding mask (Llama's attention): TVM cannot lower a vector of
    bools (the ``&`` became an int8 vector stored into bools: a build error, not a wrong number)."""
    from pock_tvm.analysis.kernel_check import compare
    from pock_tvm.targets import load_target
    from pock_tvm.targets.toolchain import tvm_target

    bb = relax.BlockBuilder()
    causal = relax.Var("causal", relax.TensorType((1, 1, 64, 64), "bool"))
    padding = relax.Var("padding", relax.TensorType((2, 1, 1, 64), "bool"))
    with bb.function("f", [causal, padding]):
        bb.emit_func_output(bb.emit_te(lambda c, p: te.compute(
            (2, 1, 64, 64), lambda b, h, i, j: c[0, h, i, j] & p[b, h, 0, j], name="both"), causal, padding,
            primfunc_name_hint="main"))
    before = bb.get()
    target = tvm_target(load_target("host"))
    with target:
        scheduled = _prim(ScheduleForCPU()(before))
    assert "T.vectorized" not in scheduled.script()
    check = compare("mask", _prim(before), scheduled, target)
    assert check is not None and check.ok, check
