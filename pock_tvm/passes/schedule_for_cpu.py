"""ScheduleForCPU: a default schedule for every CPU kernel, so an untuned step is not a set of
single-threaded scalar loops."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir.schedule import ScheduleError
from tvm.sym.pattern import detect_linear_equation
from tvm.tirx.analysis import undefined_vars

from ..analysis.kernel_check import RULES_ATTR
from .utils import SCHEDULED, is_scheduled, with_functions

logger = logging.getLogger(__name__)

_DATA_PAR, _REDUCE = 0, 2
# the channel-vectorized rule's copy: a copied (transposed) element costs about COPY_COST vector
# multiply-adds; a read whose elements are used fewer than MIN_REUSE times is streamed, not copied
# (both measured on ResNet-18's and MobileNetV2's convs, znver4; COPY_COST re-measured on
# rocketlake with the 16-accumulator tiles: 16 moves ResNet-18's 256-channel 3x3 convs at batch 8
# to a batch vector, 7% less kernel time per step, MobileNetV2 unchanged)
COPY_COST, MIN_REUSE = 16, 16
# the channel-vectorized rule's register tile: at most this many vector accumulators (of 32
# AVX-512 / NEON registers; measured on ResNet-18's 3x3 convs: 16 reach ~110 GFLOP/s, 8 ~75)
ACCUMULATORS = 16
# A read of at least this many bytes does not stay in cache between tiles of the register-tiled
# rule: the tile loop it does not depend on runs innermost of the parallel loops, so consecutive
# tiles reuse its block while cached (an LM head's 113 MB weight was read once per row group)
STREAMED_BYTES = 1 << 20
# the register-tiled rule packs its right operand into panels where a step of the reduction jumps
# at least this many bytes (one row of N). Measured on 128-row matmuls (znver3): rows of 576 and
# a fused kernel's tail goes inside its producer's parallel loop even when the producer is scalar
# once the producer's output would be this much scratch (computed per iteration instead)
SCRATCH_INSIDE_BYTES = 1 << 18
# 1536 floats 38-61 -> 56-69 GFLOP/s packed; rows of 96 and 192 the same either way
PANEL_ROW_BYTES = 2048
# vector registers of a CPU target, by the first of these LLVM features it has: (count, bytes). The
# register-tiled rule keeps its accumulators, a loaded vector and a broadcast within them (AVX2:
# 8 rows x 2 vectors spilled, 4 rows ran a 128x576x1536 matmul at 45-57 instead of 33-36 GFLOP/s)
VECTOR_REGISTERS = (("avx512f", 32, 64), ("avx", 16, 32), ("neon", 32, 16), ("sse2", 16, 16))


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.ScheduleForCPU")
class ScheduleForCPU:
    """Reads the fused TIR kernels (after ``InlineKernelIntermediates``); schedules each kernel that
    has no schedule yet (no ``tirx.is_scheduled`` attribute), block by block, with the first rule
    that applies:

    - **vectorized reduction** (weight gradients, bias and BN-parameter gradients: the output is
      short, the reduction long, at least 1024, and runs along the primary input's innermost
      dimension): that reduction loop (fused with the one above when shorter than 64) is split by
      ``lanes`` and factored out (``rfactor``) into a vector of partial sums, summed at the end;
      used when the partial sums stay small (spatial work x ``lanes`` <= 65536) and the output has
      no full register tile (a vector of at least ``lanes`` outputs and a tile loop), which wins
      then (measured on MobileNetV2's weight gradients);
    - **channel-vectorized reduction** (convs with a window or a stride, e.g. a 3x3 conv with
      padding or a network's first stride-2 conv: a vector along an output row would gather its
      inputs or mask them at the borders): the vector runs over a loop (at least 8 long) that one
      read follows as a whole dimension and no other read follows, read from a copy of that input
      with the dimension innermost: output channels from the weights, or the batch from the
      activations where the weights are large (the cheaper by ``work / lanes + COPY_COST x copy``;
      each copied element must be used ``MIN_REUSE`` times; the copy is parallel and written
      contiguously); the register tile is up to 16 outputs of the row (two rows fused where rows
      are short) times up to 4 channel vectors (or, where the channels make one vector, e.g. a
      batch of 8, up to 4 of another output loop), at most ``ACCUMULATORS`` vectors, accumulated
      with the channel dimension innermost so that each vector stays in a register. Also for
      gathers by parity (a strided conv's input gradient);
    - **register-tiled reduction** (1x1 convs, their input gradients, matmuls: a reduction longer
      than ``short_reduction`` whose output's innermost dimension is at least 4 long and reads every
      input contiguously or not at all along it): the output's
      innermost loop (fused with the next when shorter than ``lanes``) is the vector loop; a
      spatial loop that the primary input does not depend on (output channels of a conv) is tiled
      by up to 8 and unrolled, so each loaded input vector feeds that many accumulators; the
      reduction runs between the outer loops and that register tile, which accumulates in a local
      buffer written back once;
    - **small window** (a depthwise 3x3 window, at most ``short_reduction`` long, over rows shorter
      than ``lanes``: maps of 8x8 and 4x4): rows fused with the ones above are the vector loop,
      below the window's loops, which are unrolled (larger maps keep the plain rule: measured
      faster there);
    - **plain reduction** (anything else with a reduction): the innermost spatial loop with extent
      >= 2 is split by a vector width and moved below the reduction loops; a short reduction (a
      depthwise 3x3 window) keeps its order and only the outer loops are parallel;
    - **epilogue** (the elementwise tail of a fused kernel: the optimizer update after a weight
      gradient, BatchNorm after a conv): computed inside its producer's parallel loop, on the
      part of the output that iteration produced while it is in cache, vectorized along its
      contiguous run (for producers that are parallel and vectorized);
    - **spatial** (elementwise, broadcast, injective): the loops below the outermost fused (all
      loops where those are shorter than a vector), split by a vector width, the inner part
      vectorized, the outer part fused with the outermost and parallel.

    "The primary input" above is the read the schedule is built around: the data input (a conv's
    activations, following the output's innermost loop) unless the largest read is streamed (used
    fewer than ``MIN_REUSE`` times per element: a conv's weights over 2x2 maps at batch 1).

    The two outermost remaining loops are fused and parallel when the block does at least
    ``min_parallel_work`` iterations. A schedule never changes what a kernel computes (TVM's
    schedule primitives keep semantics; sums may be added in another order). When a tiled rule
    fails on a kernel, the kernel gets the plain rules; a kernel no rule can schedule (plain-loop
    kernels without blocks, unusual loop nests) keeps its loops. Scheduled kernels get
    ``tirx.is_scheduled``, so a tuning database applied earlier wins. For CPU targets; GPU targets
    use ``ScheduleForGPU``.
    """

    def __init__(self, lanes: int = 16, min_parallel_work: int = 1 << 14, short_reduction: int = 9):
        self.lanes = lanes
        self.min_parallel_work = min_parallel_work
        self.short_reduction = short_reduction

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates, skipped = {}, []
        for gvar, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc) or is_scheduled(func):
                continue
            scheduled = self.schedule(func)
            if scheduled is None:
                skipped.append(gvar.name_hint)
            else:
                updates[gvar] = scheduled
        if not updates:
            return mod
        mod = with_functions(mod, updates)
        logger.info("ScheduleForCPU: %d kernels scheduled, %d kept as loops%s", len(updates), len(skipped),
                    f" ({', '.join(skipped[:5])})" if skipped else "")
        return mod

    def schedule(self, func: tvm.tirx.PrimFunc, plain_only: bool = False) -> tvm.tirx.PrimFunc | None:
        """``func`` scheduled, marked scheduled and with the rules that scheduled it (one per block,
        in the attribute ``pock_tvm.schedule_rules``), or None if no rule applies. ``plain_only``:
        only the plain reduction rule (the fallback when a tiled rule fails or computes wrong)."""
        found = self._apply(s_tir.Schedule(func), plain_only)
        if found is None:
            return None
        sch, rules = found
        return sch.mod["main"].with_attrs({SCHEDULED: True, RULES_ATTR: ",".join(rules)})

    def apply(self, sch: s_tir.Schedule, plain_only: bool = False) -> s_tir.Schedule | None:
        """The kernel ``main`` of ``sch`` scheduled (a traced copy, so it can be stored as a tuning
        record), or None if no rule applies. ``sch`` itself is not changed."""
        found = self._apply(sch, plain_only)
        return found[0] if found is not None else None

    def _apply(self, sch: s_tir.Schedule, plain_only: bool) -> tuple[s_tir.Schedule, list[str]] | None:
        tiled = (self._vectorized_reduction, self._channel_vectorized, self._register_tiled, self._small_window,
                 self._plain_reduction)
        choices = ((self._plain_reduction,),) if plain_only else (tiled, (self._plain_reduction,))
        for reduction_rules in choices:
            work = sch.copy()
            try:
                done = [self._first(work, block, reduction_rules)
                        for block in work.get_child_blocks(work.get_sblock("root"))]
            except (ScheduleError, RuntimeError, ValueError, IndexError) as err:  # TVM raises its errors as these
                func = sch.mod["main"]
                logger.info("ScheduleForCPU: a rule failed on %s: %s", func.attrs.get("global_symbol", "?")
                            if func.attrs else "?", str(err).splitlines()[0] if str(err) else type(err).__name__)
                continue
            rules = [rule for rule in done if rule]
            return (work, rules) if rules else None
        return None

    def _first(self, sch, block, reduction_rules) -> str | None:
        """The name of the rule that scheduled ``block`` (the first that applies), or None."""
        nest = _Nest.of(sch, block)
        if nest is None:
            return None
        rules = (self._epilogue, self._spatial) if _REDUCE not in nest.kinds else reduction_rules
        return next((rule.__name__.lstrip("_") for rule in rules if rule(sch, nest)), None)

    # -- rules: each returns False, without changing the schedule, when it does not apply --

    def _spatial(self, sch, nest: _Nest) -> bool:
        loops, rest = nest.loops, nest.work(range(1, len(nest.loops)))
        # the vector splits the inner loops fused and the outermost stays apart where they are long
        # enough: a split of all loops fused over odd inner dims (a 3x3 weight's SGD update) leaves
        # index arithmetic that is computed lane by lane (4x slower)
        head = loops[0] if len(loops) > 1 and rest >= self.lanes and self._lanes(rest) else None
        body = loops[1:] if head is not None else loops
        fused = sch.fuse(*body) if len(body) > 1 else body[0]
        lanes = self._lanes(_extent(sch, fused))
        outer, inner = fused, None
        if lanes == _extent(sch, fused):
            outer, inner = None, fused
        elif lanes:
            outer, inner = sch.split(fused, [None, lanes])
        if head is not None:
            outer = sch.fuse(head, outer) if outer is not None else head
        if outer is not None and nest.work() >= self.min_parallel_work:
            sch.parallel(outer)
        if inner is not None:
            sch.vectorize(inner)
        return True

    def _epilogue(self, sch, nest: _Nest) -> bool:
        producers = [b for b in sch.get_producers(nest.block) if sch.get_loops(b)]
        if len(producers) != 1:
            return False
        loops = sch.get_loops(producers[0])
        top, kinds = loops[0], [sch.get(lp).kind for lp in loops]
        written = sch.get(producers[0]).writes[0].source
        if not _reads_in_place(sch.get(nest.block), written):
            return False  # a shifted or strided read (a slice, a pad) would read outputs of other tiles
        large = _numel(written) * written.dtype.bits // 8 >= SCRATCH_INSIDE_BYTES
        if kinds[0] != tvm.tirx.ForKind.PARALLEL or (kinds[-1] != tvm.tirx.ForKind.VECTORIZED and not large):
            return False  # (a scalar producer, e.g. a short reduction: measured faster apart, unless its
            # whole output would be scratch memory: a depthwise conv's int32 sums over a 64x64 map)
        sch.reverse_compute_at(nest.block, top)
        tail = _contiguous_tail(sch, sch.get_loops(nest.block)[1:])
        fused = sch.fuse(*tail) if len(tail) > 1 else tail[0] if tail else None
        lanes = self._lanes(_extent(sch, fused)) if fused is not None else None
        if lanes:
            sch.vectorize(fused if lanes == _extent(sch, fused) else sch.split(fused, [None, lanes])[1])
        return True

    def _register_tiled(self, sch, nest: _Nest) -> bool:
        axes = self._tile_axes(nest)
        if axes is None or any(nest.stride(r, axes[0]) not in (0, 1) for r in nest.reads):
            return False  # a vector of outputs would gather its inputs
        v, u, rows = axes
        loops, extents, spatial = list(nest.loops), list(nest.extents), list(nest.spatial)
        if rows:  # short rows: one vector over two dims
            _fuse_rows(sch, loops, extents, spatial, v)
        width = self._lanes(extents[v], align=nest.extents[v] if rows else None)
        factors = {v: width, **({u: _tile(extents[u], _tile_rows(width))} if u is not None else {})}
        outer, inner = _split_spatial(sch, loops, spatial, extents, factors)
        outer, dims = _reuse_streamed_read(nest, outer, [i for i in spatial if factors.get(i) != extents[i]])
        vector, tile = inner[v], inner.get(u)
        reduce = [loops[i] for i in nest.reduce]
        sch.reorder(*outer, *reduce, *([tile] if tile is not None else []), vector)
        panel = self._panel_read(nest, v, width)
        # a panel per iteration of the loops above the innermost tile loop, when that loop does not
        # move the panel (packed once, used by every tile of the loop); else the whole read, if small
        per_tile = panel is not None and len(outer) >= 2 and dims[-1] not in set().union(*panel.dims)
        if per_tile:
            above = sch.fuse(*outer[:-1]) if len(outer) > 2 else outer[0]
            outer = [above, outer[-1]]
            self._pack(sch, nest, panel, width, at=above)
        elif panel is not None and _numel(panel.buffer) * 4 < STREAMED_BYTES:
            self._pack(sch, nest, panel, width)
        if tile is not None and outer:  # the register tile accumulates locally, written back once
            _accumulate_locally(sch, nest.block, outer[-1])
        if per_tile:
            sch.parallel(outer[0])
        else:
            self._parallel(sch, outer, nest.work())
        if tile is not None:
            sch.unroll(tile)
        sch.vectorize(vector)
        _split_init(sch, nest.block, reduce[0])
        return True

    def _channel_vectorized(self, sch, nest: _Nest) -> bool:
        v = nest.output_inner()
        if v not in nest.spatial:
            return False
        inner = nest.primary_varying()(0)
        window = v in inner and any(i in nest.reduce for i in inner)
        if nest.primary_stride(v) in (0, 1) and not window:
            return False  # a row of outputs reads a contiguous row of the input: register tile
        # the vector loop: one that a single read follows as a whole dimension (that read is copied
        # with the dimension innermost) and no other read follows; the cheapest by work / lanes +
        # COPY_COST x the copy (output channels from the weights, or the batch from the activations
        # where the weights are large), each copied element used at least MIN_REUSE times
        options = [(nest.work() / lanes + COPY_COST * _numel(r.buffer), i, r) for i in nest.spatial if i != v
                   and (lanes := self._lanes(nest.extents[i]) or 0) >= 8
                   for r in nest.reads if {i} in r.dims
                   and not any(i in d for q in nest.reads if q is not r for d in q.dims)
                   and nest.work() >= MIN_REUSE * _numel(r.buffer)]
        if not options:
            return False
        _, c, weight = min(options, key=lambda o: (o[0], -o[1]))  # ties: the loop nearer the output's rows
        lanes = self._lanes(nest.extents[c])
        loops, extents, spatial = list(nest.loops), list(nest.extents), list(nest.spatial)
        rows = extents[v] < ACCUMULATORS and nest.rows_above(v) and v - 1 != c
        row = extents[v] * (extents[v - 1] if rows else 1)  # short rows: the tile spans two dims
        tile = _tile(row, ACCUMULATORS, align=extents[v] if rows else None)
        if tile is None:
            return False
        # the register tile: ``tile`` outputs of the row times ``vectors`` vectors of channels
        vectors = next(k for k in (4, 2, 1) if tile * k <= ACCUMULATORS and extents[c] % (lanes * k) == 0)
        factors = {v: tile, c: lanes * vectors}
        # or, where the channels give one vector (the batch of 8), a few of another output loop (the
        # output channels: one row of the streamed weights is then used whole)
        other = next((i for i in reversed(spatial) if i not in (v, v - 1 if rows else v, c)
                      and vectors == 1 and extents[i] % 2 == 0), None)
        others = next((k for k in (4, 2) if other is not None and tile * k <= ACCUMULATORS
                       and extents[other] % k == 0), None)
        if others:
            factors[other] = others
        after = {**dict(enumerate(extents)), v: row}  # extents once the rows are fused
        if all(factors.get(i) == after[i] for i in spatial if not (rows and i == v - 1)):
            return False  # nothing outside the tile to accumulate it under
        if rows:
            _fuse_rows(sch, loops, extents, spatial, v)
        outer, inner = _split_spatial(sch, loops, spatial, extents, factors)
        group, vector = sch.split(inner[c], [vectors, lanes]) if vectors > 1 else (inner.get(other), inner[c])
        sch.reorder(*outer, *[loops[i] for i in nest.reduce], *([group] if group is not None else []), inner[v],
                    vector)
        _accumulate_locally(sch, nest.block, outer[-1], innermost=nest.write.index({c}))
        copy = sch.cache_read(nest.block, weight.index, "global")  # the weights, channel innermost
        d = weight.dims.index({c})
        sch.transform_layout(copy, ("write", 0), _moved_innermost(d, len(weight.dims)))
        self._copy(sch, copy, d, _numel(weight.buffer))
        self._parallel(sch, outer, nest.work())
        if group is not None:
            sch.unroll(group)
        sch.unroll(inner[v])
        sch.vectorize(vector)
        _split_init(sch, nest.block, loops[nest.reduce[0]])
        return True

    def _panel_read(self, nest: _Nest, v: int, width: int) -> _Read | None:
        """The read a register tile walks across rows: ``[..., K, N]`` with the vector loop along N
        and the reduction along K, each step of K a jump of a row of N (a matmul's right operand);
        None when there is none, or it is used fewer than ``MIN_REUSE`` times, or N does not split
        into panels of ``width``."""
        for read in nest.reads:
            if len(read.dims) >= 2 and read.dims[-1] == {v} and len(read.dims[-2]) == 1 \
                    and next(iter(read.dims[-2])) in nest.reduce and nest.stride(read, v) == 1 \
                    and nest.extents[v] % width == 0 and nest.work() >= MIN_REUSE * _numel(read.buffer) \
                    and nest.extents[v] * read.buffer.dtype.bits // 8 >= PANEL_ROW_BYTES:
                return read
        return None

    def _pack(self, sch, nest: _Nest, read: _Read, width: int, at=None) -> None:
        """Copy ``read`` (``[..., K, N]``) into panels ``[..., N / width, K, width]``, so a tile's
        walk over K reads one contiguous panel instead of one cache line per row of N (page-sized
        strides defeat the prefetcher: an LM head's weight ran at 8 GFLOP/s). With ``at`` (a loop
        over panels), only that loop's panel is copied, inside it: ``K x width`` of scratch."""
        copy = sch.cache_read(nest.block, read.index, "global")
        sch.transform_layout(copy, ("write", 0), tvm.tirx.IndexMap.from_func(
            lambda *i: [*i[:-2], i[-1] // width, i[-2], i[-1] % width], ndim=len(read.dims)))
        if at is not None:
            sch.compute_at(copy, at)
            sch.vectorize(sch.get_loops(copy)[-1])
            return
        loops = sch.get_loops(copy)
        head, lane = sch.split(loops[-1], [None, width])
        sch.reorder(*loops[:-2], head, loops[-2], lane)
        outer = [*loops[:-2], head]
        if _numel(read.buffer) >= self.min_parallel_work:
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        sch.vectorize(lane)

    def _copy(self, sch, copy, d: int, numel: int) -> None:
        """A transposing copy (dimension ``d`` of the source moved innermost) walks its output
        contiguously: parallel over the other dimensions, vectorized along ``d``."""
        loops = sch.get_loops(copy)
        others = [lp for i, lp in enumerate(loops) if i != d]
        sch.reorder(*others, loops[d])
        if others and numel >= self.min_parallel_work:
            sch.parallel(sch.fuse(*others) if len(others) > 1 else others[0])
        lanes = self._lanes(_extent(sch, loops[d]))
        if lanes:
            sch.vectorize(loops[d] if lanes == _extent(sch, loops[d]) else sch.split(loops[d], [None, lanes])[1])

    def _small_window(self, sch, nest: _Nest) -> bool:
        v = nest.output_inner()
        if v not in nest.spatial or not 4 <= nest.extents[v] < self.lanes \
                or nest.work(nest.reduce) > self.short_reduction or not nest.reduce:
            return False
        if not nest.rows_above(v) or nest.primary_stride(v) != 1:
            return False  # (a strided or up-sampling window reads by parity: measured slower)
        extent = nest.extents[v] * nest.extents[v - 1]
        lanes = self._lanes(extent)
        if not lanes:
            return False  # no vector width divides two rows (e.g. 7x7 maps)
        loops, extents, spatial = list(nest.loops), list(nest.extents), list(nest.spatial)
        _fuse_rows(sch, loops, extents, spatial, v)  # short rows: one vector over two dims
        outer, inner = _split_spatial(sch, loops, spatial, extents, {v: lanes})
        window = [loops[i] for i in nest.reduce]
        sch.reorder(*outer, *window, inner[v])
        self._parallel(sch, outer, nest.work())
        for loop in window:
            sch.unroll(loop)
        sch.vectorize(inner[v])
        _split_init(sch, nest.block, window[0])
        return True

    def _tile_axes(self, nest: _Nest) -> tuple[int, int | None, bool] | None:
        """For a register tile: the vector loop (the output's innermost), the tile loop (a spatial
        loop the primary input does not depend on, or None) and whether the vector loop takes in
        the row above it (short rows); None when the output has no such vector loop."""
        v = nest.output_inner()
        if v not in nest.spatial or nest.extents[v] < 4 or not nest.reduce:
            return None
        rows = nest.extents[v] < self.lanes and nest.rows_above(v)
        if not self._lanes(nest.extents[v] * (nest.extents[v - 1] if rows else 1),
                           align=nest.extents[v] if rows else None):
            return None  # no vector width divides the row (e.g. 13x13 maps)
        used = nest.primary_vars()
        u = next((i for i in reversed(nest.spatial) if i not in (v, v - 1 if rows else v)
                  and i not in used and nest.extents[i] >= 2), None)
        if nest.work(nest.reduce) <= self.short_reduction and u is None:
            return None  # a short reduction (a depthwise window) tiles only with reuse (a 1x1 conv of 8 channels)
        return v, u, rows

    def _vectorized_reduction(self, sch, nest: _Nest) -> bool:
        reduce, axes = nest.reduce, self._tile_axes(nest)
        if axes is not None and axes[1] is not None and nest.extents[axes[0]] * (
                nest.extents[axes[0] - 1] if axes[2] else 1) >= self.lanes:
            return False  # a full register tile is the better schedule
        if nest.kinds != sorted(nest.kinds) or nest.work(reduce) < 1024 \
                or nest.work(nest.spatial) * self.lanes > 1 << 16:
            return False
        r, varying = reduce[-1], nest.primary_varying()
        if r not in varying(0) or any(nest.extents[i] >= nest.extents[r] for i in varying(0) - {r}):
            return False  # the input's contiguous run must follow this reduction loop
        rows = nest.extents[r] < 64 and r - 1 in reduce and r - 1 in varying(1)
        lanes = self._lanes(nest.extents[r] * (nest.extents[r - 1] if rows else 1))
        if not lanes or lanes < 4:
            return False
        loops = list(nest.loops)
        if rows:
            loops[r - 1:r + 1] = [sch.fuse(loops[r - 1], loops[r])]  # one run over two dims
        used = nest.primary_vars()
        u = next((i for i in reversed(nest.spatial) if i not in used and nest.extents[i] >= 2), None)
        window = u is None and self._shared_window(nest)
        if window:
            u = nest.spatial[-1]
        _, lane = sch.split(loops[-1], [None, lanes])
        partial = sch.rfactor(lane, factor_axis=0)  # partial sums, one per lane
        loops = sch.get_loops(partial)  # the same nest: spatial..., reduce..., lane
        reduce_loops = loops[len(nest.spatial):-1]
        loops, extents, spatial = list(loops), list(nest.extents), list(nest.spatial)
        if window:  # the output's last two dims as one tile
            _fuse_rows(sch, loops, extents, spatial, u)
        tile = _tile(extents[u], ACCUMULATORS if window else 8) if u is not None else None
        outer, inner = _split_spatial(sch, loops, spatial, extents, {u: tile} if tile else {})
        tile_loop = inner.get(u)
        sch.reorder(*outer, *reduce_loops, *([tile_loop] if tile_loop is not None else []), loops[-1])
        write_back = sch.cache_write(partial, 0, "local")
        if outer:
            sch.reverse_compute_at(write_back, outer[-1])
        # the lanes innermost in the local buffer: each output's partial sums are one register
        sch.transform_layout(partial, ("write", 0), _moved_innermost(0, len(sch.get(partial).writes[0].region)))
        self._parallel(sch, outer, nest.work())
        if tile_loop is not None:
            sch.unroll(tile_loop)
        sch.vectorize(loops[-1])
        _split_init(sch, partial, reduce_loops[0])
        return True

    def _shared_window(self, nest: _Nest) -> bool:
        """Whether the output's last two dims (a depthwise weight gradient's 3x3 window) are loops
        that another read does not follow: one vector of it then feeds every output of the window."""
        if len(nest.spatial) < 2 or nest.spatial[-2] != nest.spatial[-1] - 1:
            return False
        a, b = nest.spatial[-2:]
        primary = nest.primary_vars()
        return nest.extents[a] * nest.extents[b] <= ACCUMULATORS and min(nest.extents[a], nest.extents[b]) >= 2 \
            and any(not ({a, b} & set().union(*r.dims)) for r in nest.reads if set().union(*r.dims) != primary)

    def _plain_reduction(self, sch, nest: _Nest) -> bool:
        loops = nest.loops
        spatial = [loops[i] for i in nest.spatial]
        reduce = [loops[i] for i in nest.reduce]
        if not spatial:
            return False
        inner = None
        if nest.work(nest.reduce) > self.short_reduction:
            index = next((i for i in reversed(range(len(spatial))) if (_extent(sch, spatial[i]) or 0) >= 2), None)
            lanes = self._lanes(_extent(sch, spatial[index])) if index is not None else None
            if lanes:
                vector = spatial[index]
                if lanes == _extent(sch, vector):
                    inner, spatial = vector, spatial[:index] + spatial[index + 1:]
                else:
                    outer_part, inner = sch.split(vector, [None, lanes])
                    spatial = spatial[:index] + [outer_part] + spatial[index + 1:]
        # spatial loops outside, then the reduction, then the vector loop
        sch.reorder(*spatial, *reduce, *([inner] if inner is not None else []))
        self._parallel(sch, spatial, nest.work())
        if inner is not None:
            sch.vectorize(inner)  # before splitting off the init: vectorize needs the whole reduction block
            _split_init(sch, nest.block, reduce[0])
        return True

    def _parallel(self, sch, outer: list, work: int) -> None:
        if outer and work >= self.min_parallel_work:
            sch.parallel(sch.fuse(*outer[:2]) if len(outer) > 1 else outer[0])

    def _lanes(self, extent: int | None, align: int | None = None) -> int | None:
        """The vector width for a loop of ``extent``: all of it when short, else a divisor. With
        ``align`` (the loop is rows of ``align`` fused), a width that covers whole rows or divides
        a row (see :func:`_aligned`)."""
        if extent is None or extent < 2:
            return None
        if extent <= self.lanes:
            return extent
        return next((v for v in (16, 8, 4, 2) if v <= self.lanes and extent % v == 0 and _aligned(v, align)), None)


@dataclass
class _Read:
    index: int  # of the block's read regions
    buffer: object
    dims: list[set[int]]  # per dimension: the loops its index uses
    starts: list  # per dimension: the index expression


@dataclass
class _Nest:
    """One block under one loop per block variable (in order), and what its accesses depend on."""

    block: object
    loops: list
    kinds: list[int]  # per loop: _DATA_PAR or _REDUCE
    extents: list[int]
    block_vars: list
    reads: list[_Read]  # all but the output
    write: list[set[int]]

    @staticmethod
    def of(sch, block) -> _Nest | None:
        stmt = sch.get(block)
        loops = sch.get_loops(block)
        kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
        extents = [_extent(sch, lp) for lp in loops]
        if len(loops) != len(kinds) or set(kinds) - {_DATA_PAR, _REDUCE} or None in extents or \
                [int(iv.dom.extent) for iv in stmt.iter_vars] != extents or len(stmt.writes) != 1:
            return None  # one loop per block variable, no opaque iterators, static extents
        block_vars = [iv.var for iv in stmt.iter_vars]

        def dims(region):
            return [{i for i, var in enumerate(block_vars) if var in set(undefined_vars(r.min))}
                    for r in region.region]

        write = stmt.writes[0]
        reads = [_Read(k, r.source, dims(r), [d.min for d in r.region]) for k, r in enumerate(stmt.reads)
                 if not r.source.same_as(write.source)]
        return _Nest(block, list(loops), kinds, extents, block_vars, reads, dims(write))

    @property
    def spatial(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == _DATA_PAR]

    @property
    def reduce(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == _REDUCE]

    def work(self, indices=None) -> int:
        total = 1
        for i in range(len(self.loops)) if indices is None else indices:
            total *= self.extents[i]
        return total

    def _varying(self, dims: list[set[int]], skip: int) -> set[int]:
        """The loops (extent > 1) that the ``skip``-th innermost varying dimension depends on."""
        found = [d for d in ({i for i in d if self.extents[i] > 1} for d in reversed(dims)) if d]
        return found[skip] if skip < len(found) else set()

    def output_inner(self, skip: int = 0) -> int | None:
        """The one loop the output's innermost varying dimension (``skip`` = 1: the next) follows."""
        found = self._varying(self.write, skip)
        return next(iter(found)) if len(found) == 1 else None

    def rows_above(self, loop: int) -> bool:
        """Whether the loop just outside ``loop`` is the output's next dimension (rows of a map)."""
        return loop - 1 in self.spatial and self.output_inner(1) == loop - 1

    def _primary(self) -> _Read | None:
        """The input the schedule is built around: the largest read when the kernel streams it
        (each element used fewer than ``MIN_REUSE`` times: the weights of a conv over 2x2 maps at
        batch 1), else the data input, the largest read that follows the output's innermost loop
        (a conv's activations, even where its weights are larger: deep layers at batch 1)."""
        largest = max(self.reads, key=lambda r: _numel(r.buffer), default=None)
        v = self.output_inner()
        if largest is None or v is None or self.work() < MIN_REUSE * _numel(largest.buffer):
            return largest
        return max((r for r in self.reads if any(v in d for d in r.dims)), key=lambda r: _numel(r.buffer),
                   default=largest)

    def primary_vars(self) -> set[int]:
        primary = self._primary()
        return set().union(*primary.dims) if primary else set()

    def primary_varying(self):
        dims = self._primary().dims if self._primary() else []
        return lambda skip: self._varying(dims, skip)

    def primary_stride(self, loop: int) -> int | None:
        primary = self._primary()
        return self.stride(primary, loop) if primary is not None else None

    def stride(self, read: _Read, loop: int) -> int | None:
        """How far apart in ``read``'s innermost dimension two neighbours of ``loop`` are (None:
        not linear, e.g. the ``(h + dh - 1) // 2`` of a strided conv's input gradient, or the loop
        also moves an outer dimension: the channels of a weight gradient's activations)."""
        if not read.starts or any(loop in d for d in read.dims[:-1]):
            return None
        coefficients = detect_linear_equation(read.starts[-1], [self.block_vars[loop]])
        return int(coefficients[0]) if coefficients and isinstance(coefficients[0], tvm.tirx.IntImm) else None


def _split_spatial(sch, loops, spatial, extents, factors) -> tuple[list, dict]:
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


def _reuse_streamed_read(nest: _Nest, outer: list, outer_dims: list[int]) -> list:
    """``(outer, outer_dims)`` (the tile loops and their block variables) with the last loop that
    the largest read does not depend on moved innermost, when that read is at least ``STREAMED_BYTES``."""
    largest = max(nest.reads, key=lambda r: _numel(r.buffer), default=None)
    if largest is None or _numel(largest.buffer) * largest.buffer.dtype.bits // 8 < STREAMED_BYTES:
        return outer, outer_dims
    used = set().union(*largest.dims)
    free = [k for k, i in enumerate(outer_dims) if i not in used and nest.extents[i] > 1]
    if not free or free[-1] == len(outer) - 1:
        return outer, outer_dims
    k = free[-1]
    return outer[:k] + outer[k + 1:] + [outer[k]], outer_dims[:k] + outer_dims[k + 1:] + [outer_dims[k]]


def _fuse_rows(sch, loops: list, extents: list, spatial: list, v: int) -> None:
    """Loop ``v`` and the one above it (rows of a map) as one loop, in place in the lists."""
    loops[v] = sch.fuse(loops[v - 1], loops[v])
    extents[v] *= extents[v - 1]
    spatial.remove(v - 1)


def _contiguous_tail(sch, loops) -> list:
    """The innermost of ``loops`` (over one block) that walk its output contiguously: the last
    dimension's loop, and the ones outside it while each inner loop covers its whole dimension."""
    if not loops or not isinstance(sch.get(loops[-1]).body, s_tir.SBlockRealize):
        return []
    realize = sch.get(loops[-1]).body
    write = realize.block.writes[0]
    binding = {iv.var: value for iv, value in zip(realize.block.iter_vars, realize.iter_values)}

    def dim(loop):
        var = sch.get(loop).loop_var
        found = [d for d, r in enumerate(write.region)
                 if any(var.same_as(u) for b in undefined_vars(r.min) if b in binding
                        for u in undefined_vars(binding[b]))]
        return found[0] if len(found) == 1 else None

    tail, expect = [], len(write.region) - 1
    for loop in reversed(loops):
        if dim(loop) != expect:
            break
        tail.insert(0, loop)
        if _extent(sch, loop) != _extent_of(write.source.shape[expect]):
            break  # a partial dimension ends the contiguous run
        expect -= 1
    return tail


def _reads_in_place(block, buffer) -> bool:
    """Whether ``block`` reads ``buffer`` only where it writes its output, and its output has
    ``buffer``'s shape: an elementwise tail. Computed inside its producer's loop, a tail that reads
    shifted or strided would need outputs another iteration makes, and a larger output (a pad after
    a transposed conv) has elements no iteration covers: they were never written (a max-pool
    gradient 1e3 off)."""
    if [str(d) for d in block.writes[0].source.shape] != [str(d) for d in buffer.shape]:
        return False
    out = block.writes[0].region
    reads = [r for r in block.reads if r.source.same_as(buffer)]
    if not reads:
        return False
    for read in reads:
        if len(read.region) != len(out) or any(
                not tvm_ffi.structural_equal(a.min, b.min) or not tvm_ffi.structural_equal(a.extent, b.extent)
                for a, b in zip(read.region, out)):
            return False
    return True


def _extent_of(dim) -> int | None:
    return int(dim) if isinstance(dim, tvm.tirx.IntImm) else None


def _accumulate_locally(sch, block, at, innermost: int | None = None) -> None:
    """The block's output tile accumulates in a local buffer under loop ``at``, written back once;
    with dimension ``innermost`` (the vector's) stored innermost there, so that each vector of
    accumulators is contiguous and stays in a register."""
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, at)
    if innermost is not None and innermost != len(sch.get(block).writes[0].region) - 1:
        sch.transform_layout(block, ("write", 0), _moved_innermost(innermost, len(sch.get(block).writes[0].region)))
    sch.vectorize(sch.get_loops(write_back)[-1])


def _split_init(sch, block, loop) -> None:
    """The reduction's initialisation as its own vectorized loop, before ``loop``."""
    sch.vectorize(sch.get_loops(sch.decompose_reduction(block, loop))[-1])


def _extent(sch, loop) -> int | None:
    return _extent_of(sch.get(loop).extent)


def _numel(buffer) -> int:
    total = 1
    for d in buffer.shape:
        total *= _extent_of(d) or 1
    return total


def _tile_rows(width: int, limit: int = 8) -> int:
    """How many rows of ``width`` float32 accumulators a register tile can hold on the current
    target (``limit`` where the target is not known)."""
    target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return limit
    from tvm.target import codegen

    for feature, count, size in VECTOR_REGISTERS:
        if codegen.target_has_features(feature, target):
            per_row = max(1, width * 4 // size)
            return max(1, min(limit, (count - 4) // per_row))
    return limit


def _tile(extent: int, limit: int = 8, align: int | None = None) -> int | None:
    """A register tile: the largest divisor of ``extent`` up to ``limit`` (aligned to rows of
    ``align``, see :func:`_aligned`)."""
    return next((t for t in range(min(limit, extent), 1, -1) if extent % t == 0 and _aligned(t, align)), None)


def _aligned(tile: int, row: int | None) -> bool:
    """Whether tiles of ``tile`` over rows of ``row`` fused start and end with rows: ``tile``
    covers whole rows or divides a row. A tile that straddles rows (16 over rows of 12) is
    written back from its local accumulators by ``reverse_compute_at`` over the rows it touches,
    whole: the outputs of the neighbouring tile in those rows were overwritten with stale sums
    (a 3x3 conv over 12x12 maps computed wrong numbers)."""
    return row is None or tile % row == 0 or row % tile == 0


def _moved_innermost(d: int, ndim: int) -> tvm.tirx.IndexMap:
    """The layout with dimension ``d`` moved innermost."""
    return tvm.tirx.IndexMap.from_func(lambda *i: [*i[:d], *i[d + 1:], i[d]], ndim=ndim)
