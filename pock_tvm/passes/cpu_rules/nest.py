"""The loop analysis the CPU rules share: one block under its loops, and which loops each of its
reads and its write follow."""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.sym.pattern import detect_linear_equation
from tvm.tirx.analysis import undefined_vars

from .loops import extent, numel

DATA_PAR, REDUCE = 0, 2  # TVM's iter types of a block variable
# a read whose elements are used fewer than MIN_REUSE times is streamed, not copied or packed
# (measured on ResNet-18's and MobileNetV2's convs, znver4)
MIN_REUSE = 16


@dataclass
class Read:
    index: int  # of the block's read regions
    buffer: object
    dims: list[set[int]]  # per dimension: the loops its index uses
    starts: list  # per dimension: the index expression


@dataclass
class Nest:
    """One block under one loop per block variable (in order), and what its accesses depend on."""

    block: object
    loops: list
    kinds: list[int]  # per loop: DATA_PAR or REDUCE
    extents: list[int]
    block_vars: list
    reads: list[Read]  # all but the output
    write: list[set[int]]

    @staticmethod
    def of(sch, block) -> Nest | None:
        """The nest of ``block``, or None where the rules cannot read it (a loop per block
        variable, no opaque iterators, static extents, one output)."""
        stmt = sch.get(block)
        loops = sch.get_loops(block)
        kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
        extents = [extent(sch, lp) for lp in loops]
        if len(loops) != len(kinds) or set(kinds) - {DATA_PAR, REDUCE} or None in extents or \
                [int(iv.dom.extent) for iv in stmt.iter_vars] != extents or len(stmt.writes) != 1:
            return None
        block_vars = [iv.var for iv in stmt.iter_vars]

        def dims(region):
            return [{i for i, var in enumerate(block_vars) if var in set(undefined_vars(r.min))}
                    for r in region.region]

        write = stmt.writes[0]
        reads = [Read(k, r.source, dims(r), [d.min for d in r.region]) for k, r in enumerate(stmt.reads)
                 if not r.source.same_as(write.source)]
        return Nest(block, list(loops), kinds, extents, block_vars, reads, dims(write))

    @property
    def spatial(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == DATA_PAR]

    @property
    def reduce(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == REDUCE]

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

    def primary(self) -> Read | None:
        """The input the schedule is built around: the largest read when the kernel streams it
        (each element used fewer than ``MIN_REUSE`` times: the weights of a conv over 2x2 maps at
        batch 1), else the data input, the largest read that follows the output's innermost loop
        (a conv's activations, even where its weights are larger: deep layers at batch 1)."""
        largest = max(self.reads, key=lambda r: numel(r.buffer), default=None)
        v = self.output_inner()
        if largest is None or v is None or self.work() < MIN_REUSE * numel(largest.buffer):
            return largest
        return max((r for r in self.reads if any(v in d for d in r.dims)), key=lambda r: numel(r.buffer),
                   default=largest)

    def primary_vars(self) -> set[int]:
        primary = self.primary()
        return set().union(*primary.dims) if primary else set()

    def primary_varying(self):
        primary = self.primary()
        dims = primary.dims if primary else []
        return lambda skip: self._varying(dims, skip)

    def primary_stride(self, loop: int) -> int | None:
        primary = self.primary()
        return self.stride(primary, loop) if primary is not None else None

    def stride(self, read: Read, loop: int) -> int | None:
        """How far apart in ``read``'s innermost dimension two neighbours of ``loop`` are (None:
        not linear, e.g. the ``(h + dh - 1) // 2`` of a strided conv's input gradient, or the loop
        also moves an outer dimension: the channels of a weight gradient's activations)."""
        if not read.starts or any(loop in d for d in read.dims[:-1]):
            return None
        coefficients = detect_linear_equation(read.starts[-1], [self.block_vars[loop]])
        return int(coefficients[0]) if coefficients and isinstance(coefficients[0], tvm.tirx.IntImm) else None
