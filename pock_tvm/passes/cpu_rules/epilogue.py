"""Epilogue rule: the elementwise tail of a fused kernel, inside its producer's loop."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir
from tvm.tirx.analysis import undefined_vars

from .loops import extent, extent_of, numel, vectorize_split
from .rule import CPURule

# the tail goes inside its producer's parallel loop even when the producer is scalar once the
# producer's output would be this much scratch (computed per iteration instead)
SCRATCH_INSIDE_BYTES = 1 << 18


class Epilogue(CPURule):
    """The elementwise tail of a fused kernel (the optimizer update after a weight gradient,
    BatchNorm after a conv), computed inside its producer's parallel loop on the part of the output
    that iteration produced while it is in cache, vectorized along its contiguous run. Only for a
    tail that reads its producer elementwise with the same shape, and a producer that is parallel
    and vectorized (a scalar producer, e.g. a short reduction, measured faster apart, unless its
    whole output would be scratch: a depthwise conv's int32 sums over a 64x64 map)."""

    name = "epilogue"

    def apply(self, sch, nest, cpu) -> bool:
        producers = [b for b in sch.get_producers(nest.block) if sch.get_loops(b)]
        if len(producers) != 1:
            return False
        loops = sch.get_loops(producers[0])
        top, kinds = loops[0], [sch.get(lp).kind for lp in loops]
        written = sch.get(producers[0]).writes[0].source
        if not reads_in_place(sch.get(nest.block), written):
            return False  # a shifted or strided read (a slice, a pad) would read outputs of other tiles
        large = numel(written) * written.dtype.bits // 8 >= SCRATCH_INSIDE_BYTES
        if kinds[0] != tvm.tirx.ForKind.PARALLEL or (kinds[-1] != tvm.tirx.ForKind.VECTORIZED and not large):
            return False
        sch.reverse_compute_at(nest.block, top)
        tail = contiguous_tail(sch, sch.get_loops(nest.block)[1:])
        fused = sch.fuse(*tail) if len(tail) > 1 else tail[0] if tail else None
        if fused is not None:
            vectorize_split(sch, fused, cpu.vector_lanes(extent(sch, fused)))
        return True


def contiguous_tail(sch, loops) -> list:
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
        if extent(sch, loop) != extent_of(write.source.shape[expect]):
            break  # a partial dimension ends the contiguous run
        expect -= 1
    return tail


def reads_in_place(block, buffer) -> bool:
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
