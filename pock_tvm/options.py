"""Which training-graph optimizations the pipeline applies: one typed settings object, with presets.

``O3`` (the default) applies everything; lower levels switch optimizations off, mostly to measure
what each one buys (``compile(..., memory_phases=True)`` and the optimization benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class PipelineOptions:
    """``fold_frozen``: frozen tensors become constants of the step (``False`` keeps them as
    runtime inputs, so that ``load_state_dict`` can change them);
    ``reorder_updates``: each update right after its gradient, so gradient buffers die at once;
    ``in_place``: new parameters and optimizer state overwrite the old tensors;
    ``inline_intermediates``: stages of a fused kernel are computed on the fly instead of each
    writing a scratch buffer the size of the output (less memory, ~10% slower untuned);
    ``schedule_kernels``: every CPU kernel gets a default schedule (parallel outer loops,
    vectorized inner loop; ``ScheduleForCPU``) instead of running as scalar loops;
    ``fast_math``: float32 ``exp``/``sigmoid`` in CPU kernels are a polynomial that vectorizes
    (``FastExp``; within about one float32 rounding of libm) instead of a libm call per lane;
    ``integer_kernels``: in an int8 model, frozen convs and linear layers run on the int8 tensors
    with int32 accumulation and the int8 tensor, not a float copy, is what the backward pass keeps
    (``IntegerKernels``); off, the quantized arithmetic is simulated in float32."""

    fold_frozen: bool = True
    reorder_updates: bool = True
    in_place: bool = True
    inline_intermediates: bool = True
    schedule_kernels: bool = True
    fast_math: bool = True
    integer_kernels: bool = True

    @staticmethod
    def preset(level: str) -> PipelineOptions:
        if level not in PRESETS:
            raise ValueError(f"PipelineOptions: unknown level {level!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[level]

    @staticmethod
    def load(spec: PipelineOptions | str | None) -> PipelineOptions:
        """An options object, a preset name (``"O2"``) or ``None`` (``O3``)."""
        if spec is None:
            return PRESETS["O3"]
        if isinstance(spec, PipelineOptions):
            return spec
        return PipelineOptions.preset(str(spec))

    def without(self, *names: str) -> PipelineOptions:
        """These options, with the named optimizations switched off."""
        known = [f.name for f in fields(self)]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"PipelineOptions: unknown optimization {unknown}; known: {', '.join(known)}")
        return replace(self, **{n: False for n in names})


NONE = PipelineOptions(**{f.name: False for f in fields(PipelineOptions)})
PRESETS = {
    "O0": NONE,
    "O1": replace(NONE, fold_frozen=True),
    "O2": replace(NONE, fold_frozen=True, reorder_updates=True, in_place=True, schedule_kernels=True,
                  integer_kernels=True),
    "O3": PipelineOptions(),
}
