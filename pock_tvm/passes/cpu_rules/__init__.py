"""The default CPU schedule rules of ``ScheduleForCPU``, one rule per file (in the manner of
``tvm.s_tir.dlight``), composed in explicit ordered lists: a block gets the first rule that applies.

- ``nest.py``: the loop analysis every rule reads (which loops each access follows, the primary input);
- ``loops.py``: the loop transformations they share; ``cpu.py``: the target's vector registers (a
  table by ISA) and the shared thresholds;
- a rule (:class:`CPURule`) schedules one block, or returns False and leaves it unchanged.
"""

from .channel_vectorized import ChannelVectorized
from .cpu import CPU, ISA, ISAS
from .epilogue import Epilogue
from .nest import Nest
from .plain_reduction import PlainReduction
from .register_tiled import RegisterTiled
from .rule import CPURule
from .small_window import SmallWindow
from .spatial import Spatial
from .vectorized_reduction import VectorizedReduction

# blocks with a reduction, in order: the tiled rules, most specific first, then the plain rule
REDUCTION_RULES = (VectorizedReduction(), ChannelVectorized(), RegisterTiled(), SmallWindow(), PlainReduction())
# blocks with no reduction: an elementwise tail inside its producer, else its own parallel vector loop
SPATIAL_RULES = (Epilogue(), Spatial())
# when a tiled rule fails on a kernel (a TVM schedule error), its reductions get this instead
FALLBACK_REDUCTION_RULES = (PlainReduction(),)

__all__ = [
    "CPU", "CPURule", "ChannelVectorized", "Epilogue", "FALLBACK_REDUCTION_RULES", "ISA", "ISAS", "Nest",
    "PlainReduction", "REDUCTION_RULES", "RegisterTiled", "SPATIAL_RULES", "SmallWindow", "Spatial",
    "VectorizedReduction",
]
