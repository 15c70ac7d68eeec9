"""Channel-vectorized rule: convs with a window or a stride, and gathers by parity."""

from __future__ import annotations

from .loops import (accumulate_locally, extent, fuse_rows, moved_innermost, numel, parallel, split_init,
                    split_spatial, tile, vectorize_split)
from .nest import MIN_REUSE
from .rule import CPURule

# a copied (transposed) element costs about COPY_COST vector multiply-adds (measured on ResNet-18's
# and MobileNetV2's convs, znver4; re-measured on rocketlake with the 16-accumulator tiles: 16 moves
# ResNet-18's 256-channel 3x3 convs at batch 8 to a batch vector, 7% less kernel time per step)
COPY_COST = 16


class ChannelVectorized(CPURule):
    """Convs with a window or a stride (a 3x3 conv with padding, a network's first stride-2 conv),
    where a vector along an output row would gather its inputs or mask them at the borders, and
    gathers by parity (a strided conv's input gradient).

    The vector runs over a loop (at least 8 long) that one read follows as a whole dimension and no
    other read follows, read from a copy of that input with the dimension innermost: output channels
    from the weights, or the batch from the activations where the weights are large (the cheaper by
    ``work / lanes + COPY_COST x copy``; each copied element must be used ``MIN_REUSE`` times; the
    copy is parallel and written contiguously); the vector is ``cpu.channel_lanes`` wide. The
    register tile is up to ``cpu.accumulators`` outputs of the row (two rows fused where rows are
    short) times up to 4 channel vectors (or, where the channels make one vector, e.g. a batch of 8,
    up to 4 of another output loop), at most ``cpu.accumulators`` vectors, accumulated with the
    channel dimension innermost so that each vector stays in a register."""

    name = "channel_vectorized"

    def apply(self, sch, nest, cpu) -> bool:
        v = nest.output_inner()
        if v not in nest.spatial:
            return False
        inner = nest.primary_varying()(0)
        window = v in inner and any(i in nest.reduce for i in inner)
        if nest.primary_stride(v) in (0, 1) and not window:
            return False  # a row of outputs reads a contiguous row of the input: register tile
        options = [(nest.work() / lanes + COPY_COST * numel(r.buffer), i, r) for i in nest.spatial if i != v
                   and (lanes := cpu.vector_lanes(nest.extents[i], limit=cpu.channel_lanes) or 0) >= 8
                   for r in nest.reads if {i} in r.dims
                   and not any(i in d for q in nest.reads if q is not r for d in q.dims)
                   and nest.work() >= MIN_REUSE * numel(r.buffer)]
        if not options:
            return False
        _, c, weight = min(options, key=lambda o: (o[0], -o[1]))  # ties: the loop nearer the output's rows
        lanes = cpu.vector_lanes(nest.extents[c], limit=cpu.channel_lanes)
        loops, extents, spatial = list(nest.loops), list(nest.extents), list(nest.spatial)
        acc = cpu.accumulators
        rows = extents[v] < acc and nest.rows_above(v) and v - 1 != c
        row = extents[v] * (extents[v - 1] if rows else 1)  # short rows: the tile spans two dims
        row_tile = tile(row, acc, align=extents[v] if rows else None)
        if row_tile is None:
            return False
        # the register tile: ``row_tile`` outputs of the row times ``vectors`` vectors of channels
        vectors = next(k for k in (4, 2, 1) if row_tile * k <= acc and extents[c] % (lanes * k) == 0)
        factors = {v: row_tile, c: lanes * vectors}
        # or, where the channels give one vector (the batch of 8), a few of another output loop (the
        # output channels: one row of the streamed weights is then used whole)
        other = next((i for i in reversed(spatial) if i not in (v, v - 1 if rows else v, c)
                      and vectors == 1 and extents[i] % 2 == 0), None)
        others = next((k for k in (4, 2) if other is not None and row_tile * k <= acc
                       and extents[other] % k == 0), None)
        if others:
            factors[other] = others
        after = {**dict(enumerate(extents)), v: row}  # extents once the rows are fused
        if all(factors.get(i) == after[i] for i in spatial if not (rows and i == v - 1)):
            return False  # nothing outside the tile to accumulate it under
        if rows:
            fuse_rows(sch, loops, extents, spatial, v)
        outer, inner = split_spatial(sch, loops, spatial, extents, factors)
        group, vector = sch.split(inner[c], [vectors, lanes]) if vectors > 1 else (inner.get(other), inner[c])
        sch.reorder(*outer, *[loops[i] for i in nest.reduce], *([group] if group is not None else []), inner[v],
                    vector)
        accumulate_locally(sch, nest.block, outer[-1], innermost=nest.write.index({c}))
        copy = sch.cache_read(nest.block, weight.index, "global")  # the weights, channel innermost
        d = weight.dims.index({c})
        sch.transform_layout(copy, ("write", 0), moved_innermost(d, len(weight.dims)))
        transposing_copy(sch, copy, d, numel(weight.buffer), cpu)
        parallel(sch, outer, nest.work(), cpu)
        if group is not None:
            sch.unroll(group)
        sch.unroll(inner[v])
        sch.vectorize(vector)
        split_init(sch, nest.block, loops[nest.reduce[0]])
        return True


def transposing_copy(sch, copy, d: int, size: int, cpu) -> None:
    """A transposing copy (dimension ``d`` of the source moved innermost) walks its output
    contiguously: parallel over the other dimensions, vectorized along ``d``."""
    loops = sch.get_loops(copy)
    others = [lp for i, lp in enumerate(loops) if i != d]
    sch.reorder(*others, loops[d])
    if others and size >= cpu.min_parallel_work:
        sch.parallel(sch.fuse(*others) if len(others) > 1 else others[0])
    vectorize_split(sch, loops[d], cpu.vector_lanes(extent(sch, loops[d])))
