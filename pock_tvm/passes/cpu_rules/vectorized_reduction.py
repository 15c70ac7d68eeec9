"""Vectorized-reduction rule: weight, bias and BN-parameter gradients (short output, long sum)."""

from __future__ import annotations

from .loops import aligned, fuse_rows, moved_innermost, parallel, split_init, split_spatial, tile
from .nest import Nest
from .register_tiled import tile_axes
from .rule import CPURule


class VectorizedReduction(CPURule):
    """The output is short, the reduction long (at least 1024) and runs along the primary input's
    innermost dimension: that reduction loop (fused with the one above when shorter than 64) is
    split by the vector width and factored out (``rfactor``) into a vector of partial sums, summed
    at the end. Two rows fused must be cut into vectors that cover whole rows or divide a row: a
    vector across a row boundary loads by gathering (a 3x3 conv's weight gradient over 24-wide
    maps ran at 7 GFLOP/s so, at 99 with the channel-vectorized rule that takes it instead). Used when the partial sums stay small (spatial work x lanes <= 65536) and the output
    has no full register tile (a vector of at least ``lanes`` outputs and a tile loop), which wins
    then (measured on MobileNetV2's weight gradients)."""

    name = "vectorized_reduction"

    def apply(self, sch, nest, cpu) -> bool:
        reduce, axes = nest.reduce, tile_axes(nest, cpu)
        if axes is not None and axes[1] is not None and nest.extents[axes[0]] * (
                nest.extents[axes[0] - 1] if axes[2] else 1) >= cpu.lanes:
            return False  # a full register tile is the better schedule
        if nest.kinds != sorted(nest.kinds) or nest.work(reduce) < 1024 \
                or nest.work(nest.spatial) * cpu.lanes > 1 << 16:
            return False
        r, varying = reduce[-1], nest.primary_varying()
        if r not in varying(0) or any(nest.extents[i] >= nest.extents[r] for i in varying(0) - {r}):
            return False  # the input's contiguous run must follow this reduction loop
        rows = nest.extents[r] < 64 and r - 1 in reduce and r - 1 in varying(1)
        lanes = cpu.vector_lanes(nest.extents[r] * (nest.extents[r - 1] if rows else 1))
        if not lanes or lanes < 4 or (rows and not aligned(lanes, nest.extents[r])):
            return False
        loops = list(nest.loops)
        if rows:
            loops[r - 1:r + 1] = [sch.fuse(loops[r - 1], loops[r])]  # one run over two dims
        used = nest.primary_vars()
        u = next((i for i in reversed(nest.spatial) if i not in used and nest.extents[i] >= 2), None)
        window = u is None and shared_window(nest, cpu)
        if window:
            u = nest.spatial[-1]
        _, lane = sch.split(loops[-1], [None, lanes])
        partial = sch.rfactor(lane, factor_axis=0)  # partial sums, one per lane
        loops = sch.get_loops(partial)  # the same nest: spatial..., reduce..., lane
        reduce_loops = loops[len(nest.spatial):-1]
        loops, extents, spatial = list(loops), list(nest.extents), list(nest.spatial)
        if window:  # the output's last two dims as one tile
            fuse_rows(sch, loops, extents, spatial, u)
        size = tile(extents[u], cpu.accumulators if window else 8) if u is not None else None
        outer, inner = split_spatial(sch, loops, spatial, extents, {u: size} if size else {})
        tile_loop = inner.get(u)
        sch.reorder(*outer, *reduce_loops, *([tile_loop] if tile_loop is not None else []), loops[-1])
        write_back = sch.cache_write(partial, 0, "local")
        if outer:
            sch.reverse_compute_at(write_back, outer[-1])
        # the lanes innermost in the local buffer: each output's partial sums are one register
        sch.transform_layout(partial, ("write", 0), moved_innermost(0, len(sch.get(partial).writes[0].region)))
        parallel(sch, outer, nest.work(), cpu)
        if tile_loop is not None:
            sch.unroll(tile_loop)
        sch.vectorize(loops[-1])
        split_init(sch, partial, reduce_loops[0])
        return True


def shared_window(nest: Nest, cpu) -> bool:
    """Whether the output's last two dims (a depthwise weight gradient's 3x3 window) are loops that
    another read does not follow: one vector of it then feeds every output of the window."""
    if len(nest.spatial) < 2 or nest.spatial[-2] != nest.spatial[-1] - 1:
        return False
    a, b = nest.spatial[-2:]
    primary = nest.primary_vars()
    return nest.extents[a] * nest.extents[b] <= cpu.accumulators and min(nest.extents[a], nest.extents[b]) >= 2 \
        and any(not ({a, b} & set().union(*r.dims)) for r in nest.reads if set().union(*r.dims) != primary)
