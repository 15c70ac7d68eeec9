"""The compiler core: a model and a scheme in, a training step out.

``plan_step`` (import, training graph, lowering, memory plan), ``build`` (code generation) and
``compile`` (both) are in :mod:`.step`; :mod:`.phases` measures what each optimization saves,
:mod:`.parity` checks a step against float64 autograd, :mod:`.tune` autotunes its kernels
(:mod:`.tuning_device` measures them here or on a board). Nothing here imports the CLI.
"""

from .step import PlannedStep, build, compile, plan_step

__all__ = ["PlannedStep", "build", "compile", "plan_step"]
