"""Loop transformations the CPU rules share (each a small step on a ``tvm.s_tir.Schedule``)."""

from __future__ import annotations

import tvm


def extent_of(dim) -> int | None:
    return int(dim) if isinstance(dim, tvm.tirx.IntImm) else None


def extent(sch, loop) -> int | None:
    return extent_of(sch.get(loop).extent)


def numel(buffer) -> int:
    total = 1
    for d in buffer.shape:
        total *= extent_of(d) or 1
    return total


def split_spatial(sch, loops, spatial, extents, factors) -> tuple[list, dict]:
    """Split each spatial loop ``i`` with a factor in ``factors`` into an outer and an inner part
    (the whole loop is inner when the factor is its extent). Returns the outer loops, in order,
    and ``{i: inner loop}``."""
    outer, inner = [], {}
    for i in spatial:
        factor = factors.get(i)
        if not factor:
            outer.append(loops[i])
        elif factor == extents[i]:
            inner[i] = loops[i]
        else:
            head, inner[i] = sch.split(loops[i], [None, factor])
            outer.append(head)
    return outer, inner


def fuse_rows(sch, loops: list, extents: list, spatial: list, v: int) -> None:
    """Loop ``v`` and the one above it (rows of a map) as one loop, in place in the lists."""
    loops[v] = sch.fuse(loops[v - 1], loops[v])
    extents[v] *= extents[v - 1]
    spatial.remove(v - 1)


def parallel(sch, outer: list, work: int, cpu) -> None:
    """The two outermost of ``outer`` fused and parallel, when the block does at least
    ``cpu.min_parallel_work`` iterations."""
    if outer and work >= cpu.min_parallel_work:
        sch.parallel(sch.fuse(*outer[:2]) if len(outer) > 1 else outer[0])


def vectorize_split(sch, loop, lanes: int | None) -> None:
    """``loop`` vectorized whole when it is ``lanes`` long, else its inner part of ``lanes``."""
    if lanes:
        sch.vectorize(loop if lanes == extent(sch, loop) else sch.split(loop, [None, lanes])[1])


def accumulate_locally(sch, block, at, innermost: int | None = None) -> None:
    """The block's output tile accumulates in a local buffer under loop ``at``, written back once;
    with dimension ``innermost`` (the vector's) stored innermost there, so that each vector of
    accumulators is contiguous and stays in a register."""
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, at)
    ndim = len(sch.get(block).writes[0].region)
    if innermost is not None and innermost != ndim - 1:
        sch.transform_layout(block, ("write", 0), moved_innermost(innermost, ndim))
    sch.vectorize(sch.get_loops(write_back)[-1])


def split_init(sch, block, loop) -> None:
    """The reduction's initialisation as its own vectorized loop, before ``loop``."""
    sch.vectorize(sch.get_loops(sch.decompose_reduction(block, loop))[-1])


def tile(extent: int, limit: int = 8, align: int | None = None) -> int | None:
    """A register tile: the largest divisor of ``extent`` up to ``limit`` (aligned to rows of
    ``align``, see :func:`aligned`)."""
    return next((t for t in range(min(limit, extent), 1, -1) if extent % t == 0 and aligned(t, align)), None)


def aligned(tile: int, row: int | None) -> bool:
    """Whether tiles of ``tile`` over rows of ``row`` fused start and end with rows: ``tile``
    covers whole rows or divides a row. A tile that straddles rows (16 over rows of 12) is
    written back from its local accumulators by ``reverse_compute_at`` over the rows it touches,
    whole: the outputs of the neighbouring tile in those rows were overwritten with stale sums
    (a 3x3 conv over 12x12 maps computed wrong numbers)."""
    return row is None or tile % row == 0 or row % tile == 0


def moved_innermost(d: int, ndim: int) -> tvm.tirx.IndexMap:
    """The layout with dimension ``d`` moved innermost."""
    return tvm.tirx.IndexMap.from_func(lambda *i: [*i[:d], *i[d + 1:], i[d]], ndim=ndim)
