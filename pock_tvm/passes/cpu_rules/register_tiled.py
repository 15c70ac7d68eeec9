"""Register-tiled rule: 1x1 convs, their input gradients, matmuls."""

from __future__ import annotations

import tvm

from .loops import accumulate_locally, fuse_rows, numel, parallel, split_init, split_spatial, tile
from .nest import MIN_REUSE, Nest, Read
from .rule import CPURule

# A read of at least this many bytes does not stay in cache between tiles: the tile loop it does
# not depend on runs innermost of the parallel loops, so consecutive tiles reuse its block while
# cached (an LM head's 113 MB weight was read once per row group)
STREAMED_BYTES = 1 << 20
# the right operand is packed into panels where a step of the reduction jumps at least this many
# bytes (one row of N). Measured on 128-row matmuls (znver3): rows of 576 and 1536 floats 38-61 ->
# 56-69 GFLOP/s packed; rows of 96 and 192 the same either way
PANEL_ROW_BYTES = 2048
# a streamed panel (K x a tile row) longer than this is walked in blocks of K_BLOCK_BYTES: an LM
# head's input gradient (K = 49152: a 9 MB panel, re-read from memory by each of 16 row tiles) ran
# at 70 GFLOP/s, in blocks of 256 rows at 120 (Sapphire Rapids-class, 2 cores)
K_BLOCK_PANEL_BYTES = 512 << 10
K_BLOCK_BYTES = 64 << 10
# the annotation of a packing stage of a constant operand: TVM's SplitLayoutRewritePreproc moves
# such a stage into a kernel of its own (folded at compile time: passes.PrepackFrozenWeights)
PREPROC = "meta_schedule.layout_rewrite_preproc"


class RegisterTiled(CPURule):
    """A reduction longer than ``cpu.short_reduction`` whose output's innermost dimension is at
    least 4 long and reads every input contiguously or not at all along it. The output's innermost
    loop (fused with the next when shorter than a vector) is the vector loop; a spatial loop that
    the primary input does not depend on (output channels of a conv) is tiled by as many rows as the
    target's registers hold (:meth:`CPU.tile_rows`) and unrolled, so each loaded input vector feeds
    that many accumulators; with such a tile loop, a row of the tile is up to ``cpu.tile_vectors``
    vectors that divide the output's row, unrolled, so each broadcast feeds that many; the reduction runs between the outer loops and that register tile,
    which accumulates in a local buffer written back once. A right operand whose rows are far apart
    is packed into panels (:func:`pack`)."""

    name = "register_tiled"

    def apply(self, sch, nest, cpu) -> bool:
        axes = tile_axes(nest, cpu)
        if axes is None or any(nest.stride(r, axes[0]) not in (0, 1) for r in nest.reads):
            return False  # a vector of outputs would gather its inputs
        v, u, rows = axes
        loops, extents, spatial = list(nest.loops), list(nest.extents), list(nest.spatial)
        if rows:  # short rows: one vector over two dims
            fuse_rows(sch, loops, extents, spatial, v)
        width = cpu.vector_lanes(extents[v], align=nest.extents[v] if rows else None)
        # a row of the tile: up to cpu.tile_vectors vectors side by side, so a broadcast feeds several
        group = 1 if rows or u is None else \
            next(g for g in range(cpu.tile_vectors, 0, -1) if extents[v] % (g * width) == 0)
        span = group * width
        factors = {v: span, **({u: tile(extents[u], cpu.tile_rows(span))} if u is not None else {})}
        outer, inner = split_spatial(sch, loops, spatial, extents, factors)
        outer, dims = reuse_streamed_read(nest, outer, [i for i in spatial if factors.get(i) != extents[i]])
        vector, tile_loop = inner[v], inner.get(u)
        vectors = None
        if group > 1:
            vectors, vector = sch.split(vector, [group, width])
        reduce = [loops[i] for i in nest.reduce]
        panel = panel_read(nest, v, span)
        # a panel per iteration of the loops above the innermost tile loop, when that loop does not
        # move the panel (packed once, used by every tile of the loop); else the whole read, if small
        # a constant right operand (a frozen weight: the kernel's ``layout_free_buffers``) is packed by a
        # stage of its own, split off and folded at compile time (passes.PrepackFrozenWeights)
        prepacked = panel is not None and layout_free(sch, panel)
        per_tile = panel is not None and len(outer) >= 2 and dims[-1] not in set().union(*panel.dims)
        block = k_block(nest, panel, span) if per_tile else None
        kblock = None
        if block is not None:  # the panel by blocks of its rows: each block stays in cache for every tile
            at = nest.reduce.index(next(iter(panel.dims[-2])))
            kblock, reduce[at] = sch.split(reduce[at], [None, block])
        unrolled = None
        if group > 1 and nest.extents[nest.reduce[-1]] % 2 == 0 and nest.extents[nest.reduce[-1]] >= 16:
            reduce[-1], unrolled = sch.split(reduce[-1], [None, 2])
            reduce.append(unrolled)
        # (no outer loop when one register tile covers the whole output, e.g. a 10-wide bias gradient)
        sch.reorder(*outer[:-1], *([kblock] if kblock is not None else []), *outer[-1:], *reduce,
                    *([tile_loop] if tile_loop is not None else []), *([vectors] if vectors is not None else []),
                    vector)
        if per_tile:
            above = sch.fuse(*outer[:-1]) if len(outer) > 2 else outer[0]
            outer = [above, outer[-1]]
            pack(sch, nest, panel, span, cpu, at=None if prepacked else kblock if kblock is not None else above,
                 preproc=prepacked)
        elif prepacked or (panel is not None and numel(panel.buffer) * 4 < STREAMED_BYTES):
            pack(sch, nest, panel, span, cpu, preproc=prepacked)
        if tile_loop is not None and outer and kblock is None:  # the tile accumulates locally, written back once
            accumulate_locally(sch, nest.block, outer[-1])
        if per_tile:
            sch.parallel(outer[0])
        else:
            parallel(sch, outer, nest.work(), cpu)
        if tile_loop is not None:
            sch.unroll(tile_loop)
        if vectors is not None:
            sch.unroll(vectors)
        if unrolled is not None:
            sch.unroll(unrolled)
        sch.vectorize(vector)
        split_init(sch, nest.block, kblock if kblock is not None else reduce[0])
        return True


def k_block(nest: Nest, panel: Read, span: int) -> int | None:
    """Rows of a streamed panel (``K x span``) per block when the whole panel passes
    :data:`K_BLOCK_PANEL_BYTES`: the largest power of two dividing K whose block fits
    :data:`K_BLOCK_BYTES`; None when the panel is small or K has no such divisor. Each tile then
    accumulates in the output across blocks (partial sums cannot stay in registers between them)."""
    k = nest.extents[next(iter(panel.dims[-2]))]
    row = span * panel.buffer.dtype.bits // 8
    if k * row <= K_BLOCK_PANEL_BYTES:
        return None
    return next((b for b in (1024, 512, 256, 128, 64, 32) if k % b == 0 and b * row <= K_BLOCK_BYTES and b < k), None)


def tile_axes(nest: Nest, cpu) -> tuple[int, int | None, bool] | None:
    """For a register tile: the vector loop (the output's innermost), the tile loop (a spatial loop
    the primary input does not depend on, or None) and whether the vector loop takes in the row
    above it (short rows); None when the output has no such vector loop."""
    v = nest.output_inner()
    if v not in nest.spatial or nest.extents[v] < 4 or not nest.reduce:
        return None
    rows = nest.extents[v] < cpu.lanes and nest.rows_above(v)
    if not cpu.vector_lanes(nest.extents[v] * (nest.extents[v - 1] if rows else 1),
                            align=nest.extents[v] if rows else None):
        return None  # no vector width divides the row (e.g. 13x13 maps)
    used = nest.primary_vars()
    u = next((i for i in reversed(nest.spatial) if i not in (v, v - 1 if rows else v)
              and i not in used and nest.extents[i] >= 2), None)
    if nest.work(nest.reduce) <= cpu.short_reduction and u is None:
        return None  # a short reduction (a depthwise window) tiles only with reuse (a 1x1 conv of 8 channels)
    return v, u, rows


def reuse_streamed_read(nest: Nest, outer: list, outer_dims: list[int]) -> tuple[list, list[int]]:
    """``(outer, outer_dims)`` (the tile loops and their block variables) with the last loop that
    the largest read does not depend on moved innermost, when that read is at least ``STREAMED_BYTES``."""
    largest = max(nest.reads, key=lambda r: numel(r.buffer), default=None)
    if largest is None or numel(largest.buffer) * largest.buffer.dtype.bits // 8 < STREAMED_BYTES:
        return outer, outer_dims
    used = set().union(*largest.dims)
    free = [k for k, i in enumerate(outer_dims) if i not in used and nest.extents[i] > 1]
    if not free or free[-1] == len(outer) - 1:
        return outer, outer_dims
    k = free[-1]
    return outer[:k] + outer[k + 1:] + [outer[k]], outer_dims[:k] + outer_dims[k + 1:] + [outer_dims[k]]


def panel_read(nest: Nest, v: int, width: int) -> Read | None:
    """The read a register tile walks across rows: ``[..., K, N]`` with the vector loop along N and
    the reduction along K, each step of K a jump of a row of N (a matmul's right operand); None when
    there is none, or it is used fewer than ``MIN_REUSE`` times, or N does not split into panels of
    ``width``."""
    for read in nest.reads:
        if len(read.dims) >= 2 and read.dims[-1] == {v} and len(read.dims[-2]) == 1 \
                and next(iter(read.dims[-2])) in nest.reduce and nest.stride(read, v) == 1 \
                and nest.extents[v] % width == 0 and nest.work() >= MIN_REUSE * numel(read.buffer) \
                and nest.extents[v] * read.buffer.dtype.bits // 8 >= PANEL_ROW_BYTES:
            return read
    return None


def layout_free(sch, read: Read) -> bool:
    """Whether ``read`` is of a parameter the kernel's callers always pass a constant for (TVM's
    ``AttachAttrLayoutFreeBuffers`` lists them as ``layout_free_buffers``)."""
    func = sch.mod["main"]
    free = (func.attrs or {}).get("layout_free_buffers", [])
    # (a TIR function's parameters and buffers share their names; 0.27 does not expose its buffer map)
    return any(func.params[int(i)].name == read.buffer.name for i in free)


def pack(sch, nest: Nest, read: Read, width: int, cpu, at=None, preproc: bool = False) -> None:
    """Copy ``read`` (``[..., K, N]``) into panels ``[..., N / width, K, width]``, so a tile's walk
    over K reads one contiguous panel instead of one cache line per row of N (page-sized strides
    defeat the prefetcher: an LM head's weight ran at 8 GFLOP/s). With ``at`` (a loop over panels),
    only that loop's panel is copied, inside it: ``K x width`` of scratch. ``preproc``: the copy is
    marked as a layout-rewrite stage (``meta_schedule.layout_rewrite_preproc``), which
    ``relax.transform.SplitLayoutRewritePreproc`` moves into a kernel of its own."""
    copy = sch.cache_read(nest.block, read.index, "global")
    sch.transform_layout(copy, ("write", 0), tvm.tirx.IndexMap.from_func(
        lambda *i: [*i[:-2], i[-1] // width, i[-2], i[-1] % width], ndim=len(read.dims)))
    if at is not None:
        sch.compute_at(copy, at)
        sch.vectorize(sch.get_loops(copy)[-1])
        return
    if preproc:
        sch.annotate(copy, PREPROC, True)
    loops = sch.get_loops(copy)
    head, lane = sch.split(loops[-1], [None, width])
    sch.reorder(*loops[:-2], head, loops[-2], lane)
    outer = [*loops[:-2], head]
    if numel(read.buffer) >= cpu.min_parallel_work:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    sch.vectorize(lane)
