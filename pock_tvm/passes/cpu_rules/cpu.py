"""What the CPU schedule rules need to know about the target: its vector registers (by ISA, a data
table) and the thresholds the rules share."""

from __future__ import annotations

from dataclasses import dataclass, replace

import tvm


@dataclass(frozen=True)
class ISA:
    """One vector ISA, named by the LLVM feature that has it."""

    feature: str
    vector_bytes: int  # one vector register
    registers: int  # vector registers the code generator may use
    lanes: int  # float32 lanes of a vector loop: one register, or more where measured faster
    channel_lanes: int  # lanes of the channel-vectorized rule's vector (its tile of accumulators)
    accumulators: int  # vectors of channel_lanes in that tile (and the reduction rule's window)
    tile_vectors: int = 1  # vector loops side by side in a register tile's row (RegisterTiled)


# by the first of these features a target has. AVX-512 (rocketlake, znver4): one register of 16 lanes,
# 16 accumulators (ResNet-18's 3x3 convs ~110 GFLOP/s, 8: ~75). AVX2, measured as a haswell build on
# a Sapphire Rapids-class CPU (benchmarks/results/vector_isa_haswell.md): 16-lane loops (two
# registers; 8 lanes made a BERT-sized encoder step 23% slower), but convs' channel tiles of one
# register and 12 accumulators (16 x 16 lanes spilled: ResNet-18@64 b8 full step 106 -> 75 ms,
# MobileNetV2 unchanged). Matmul register tiles on AVX-512: 8 rows x 3 vectors (24 accumulators;
# each broadcast feeds 3 FMAs): SmolLM2's 128x576x1536 115 -> 150-160 GFLOP/s, 8 rows x 1 vector was
# load-bound; the other ISAs keep 1 vector until measured. NEON and SSE2 keep the AVX-512 choices but
# that: not measured on a board (a NEON tile of 16 accumulators x 16 lanes likely spills; measure
# with bench_vector_isa.py --mcpu on one).
ISAS = (
    ISA("avx512f", 64, 32, lanes=16, channel_lanes=16, accumulators=16, tile_vectors=3),
    ISA("avx", 32, 16, lanes=16, channel_lanes=8, accumulators=12),
    ISA("neon", 16, 32, lanes=16, channel_lanes=16, accumulators=16),
    ISA("sse2", 16, 16, lanes=16, channel_lanes=16, accumulators=16),
)
# a target that names no ISA (no target, a generic llvm): the AVX-512 row, the rules' tested default
DEFAULT_ISA = ISAS[0]


@dataclass(frozen=True)
class CPU:
    """The target as the rules see it.

    ``lanes``: float32 lanes of a vector loop. ``registers``/``vector_bytes``: the register file a
    register tile must fit. ``channel_lanes``/``accumulators``: the channel-vectorized rule's vector
    and how many of them its tile holds (also the vectorized-reduction rule's window tile);
    ``tile_vectors``: vector loops of ``lanes`` side by side in a register tile's row; see
    :data:`ISAS` for what was measured. ``min_parallel_work``: iterations below which a block stays on one
    thread. ``short_reduction``: a reduction this short (a 3x3 window) is not worth a register tile
    without reuse.
    """

    lanes: int = DEFAULT_ISA.lanes
    vector_bytes: int = DEFAULT_ISA.vector_bytes
    registers: int = DEFAULT_ISA.registers
    channel_lanes: int = DEFAULT_ISA.channel_lanes
    accumulators: int = DEFAULT_ISA.accumulators
    tile_vectors: int = DEFAULT_ISA.tile_vectors
    min_parallel_work: int = 1 << 14
    short_reduction: int = 9

    @staticmethod
    def of(target: tvm.target.Target | None = None, **overrides) -> CPU:
        """The CPU of ``target`` (default: the current target; none: the default ISA), with
        ``overrides`` (fields of :class:`CPU`; None keeps the target's value)."""
        isa = _isa(target if target is not None else tvm.target.Target.current(allow_none=True))
        cpu = CPU(lanes=isa.lanes, vector_bytes=isa.vector_bytes, registers=isa.registers,
                  channel_lanes=isa.channel_lanes, accumulators=isa.accumulators, tile_vectors=isa.tile_vectors)
        return replace(cpu, **{k: v for k, v in overrides.items() if v is not None})

    def vector_lanes(self, extent: int | None, align: int | None = None, limit: int | None = None) -> int | None:
        """The vector width for a loop of ``extent``: all of it when short, else a divisor, at most
        ``limit`` (default ``lanes``). With ``align`` (the loop is rows of ``align`` fused), a width
        that covers whole rows or divides a row (see :func:`~.loops.aligned`)."""
        from .loops import aligned

        limit = limit or self.lanes
        if extent is None or extent < 2:
            return None
        if extent <= limit:
            return extent
        return next((v for v in (16, 8, 4, 2) if v <= limit and extent % v == 0 and aligned(v, align)), None)

    def tile_rows(self, width: int, limit: int = 8) -> int:
        """How many rows of ``width`` float32 accumulators a register tile holds: the accumulators,
        a loaded vector and a broadcast fit the registers (AVX2 with 16 lanes: 8 rows x 2 vectors
        spilled, 4 rows ran a 128x576x1536 matmul at 45-57 instead of 33-36 GFLOP/s)."""
        per_row = max(1, width * 4 // self.vector_bytes)
        return max(1, min(limit, (self.registers - 4) // per_row))


def _isa(target) -> ISA:
    if target is None or target.kind.name != "llvm":
        return DEFAULT_ISA
    from tvm.target import codegen

    return next((isa for isa in ISAS if codegen.target_has_features(isa.feature, target)), DEFAULT_ISA)
