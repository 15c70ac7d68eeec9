"""Plain reduction rule: any reduction; the fallback of every tiled rule."""

from __future__ import annotations

from .loops import extent, parallel, split_init
from .rule import CPURule


class PlainReduction(CPURule):
    """The innermost spatial loop with extent >= 2 is split by a vector width and moved below the
    reduction loops; a short reduction (a depthwise 3x3 window, at most ``cpu.short_reduction``)
    keeps its order and only the outer loops are parallel."""

    name = "plain_reduction"

    def apply(self, sch, nest, cpu) -> bool:
        loops = nest.loops
        spatial = [loops[i] for i in nest.spatial]
        reduce = [loops[i] for i in nest.reduce]
        if not spatial:
            return False
        inner = None
        if nest.work(nest.reduce) > cpu.short_reduction:
            index = next((i for i in reversed(range(len(spatial))) if (extent(sch, spatial[i]) or 0) >= 2), None)
            lanes = cpu.vector_lanes(extent(sch, spatial[index])) if index is not None else None
            if lanes:
                vector = spatial[index]
                if lanes == extent(sch, vector):
                    inner, spatial = vector, spatial[:index] + spatial[index + 1:]
                else:
                    outer_part, inner = sch.split(vector, [None, lanes])
                    spatial = spatial[:index] + [outer_part] + spatial[index + 1:]
        # spatial loops outside, then the reduction, then the vector loop
        sch.reorder(*spatial, *reduce, *([inner] if inner is not None else []))
        parallel(sch, spatial, nest.work(), cpu)
        if inner is not None:
            sch.vectorize(inner)  # before splitting off the init: vectorize needs the whole reduction block
            split_init(sch, nest.block, reduce[0])
        return True
