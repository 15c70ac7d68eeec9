"""Spatial rule: elementwise, broadcast and injective blocks."""

from __future__ import annotations

from .loops import extent
from .rule import CPURule


class Spatial(CPURule):
    """The loops below the outermost fused (all loops where those are shorter than a vector), split
    by a vector width, the inner part vectorized, the outer part fused with the outermost and
    parallel. The outermost stays apart where the inner loops are long enough: a split of all loops
    fused over odd inner dims (a 3x3 weight's SGD update) leaves index arithmetic computed lane by
    lane (4x slower)."""

    name = "spatial"

    def apply(self, sch, nest, cpu) -> bool:
        loops, rest = nest.loops, nest.work(range(1, len(nest.loops)))
        head = loops[0] if len(loops) > 1 and rest >= cpu.lanes and cpu.vector_lanes(rest) else None
        body = loops[1:] if head is not None else loops
        fused = sch.fuse(*body) if len(body) > 1 else body[0]
        lanes = None if _touches_bool(sch.get(nest.block)) else cpu.vector_lanes(extent(sch, fused))
        outer, inner = fused, None
        if lanes == extent(sch, fused):
            outer, inner = None, fused
        elif lanes:
            outer, inner = sch.split(fused, [None, lanes])
        if head is not None:
            outer = sch.fuse(head, outer) if outer is not None else head
        if outer is not None and nest.work() >= cpu.min_parallel_work:
            sch.parallel(outer)
        if inner is not None:
            sch.vectorize(inner)
        return True


def _touches_bool(stmt) -> bool:
    return any(str(r.source.dtype) == "bool" for r in (*stmt.reads, *stmt.writes))
