"""Small-window rule: a depthwise 3x3 window over small maps."""

from __future__ import annotations

from .loops import fuse_rows, parallel, split_init, split_spatial
from .rule import CPURule


class SmallWindow(CPURule):
    """A window at most ``cpu.short_reduction`` long over rows shorter than a vector (maps of 8x8
    and 4x4): rows fused with the ones above are the vector loop, below the window's loops, which
    are unrolled. Larger maps keep the plain rule (measured faster there); a strided or up-sampling
    window reads by parity (measured slower)."""

    name = "small_window"

    def apply(self, sch, nest, cpu) -> bool:
        v = nest.output_inner()
        if v not in nest.spatial or not 4 <= nest.extents[v] < cpu.lanes \
                or nest.work(nest.reduce) > cpu.short_reduction or not nest.reduce:
            return False
        if not nest.rows_above(v) or nest.primary_stride(v) != 1:
            return False
        lanes = cpu.vector_lanes(nest.extents[v] * nest.extents[v - 1])
        if not lanes:
            return False  # no vector width divides two rows (e.g. 7x7 maps)
        loops, extents, spatial = list(nest.loops), list(nest.extents), list(nest.spatial)
        fuse_rows(sch, loops, extents, spatial, v)  # short rows: one vector over two dims
        outer, inner = split_spatial(sch, loops, spatial, extents, {v: lanes})
        window = [loops[i] for i in nest.reduce]
        sch.reorder(*outer, *window, inner[v])
        parallel(sch, outer, nest.work(), cpu)
        for loop in window:
            sch.unroll(loop)
        sch.vectorize(inner[v])
        split_init(sch, nest.block, window[0])
        return True
