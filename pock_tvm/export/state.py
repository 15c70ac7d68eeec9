"""A fine-tuned step's parameters in the original architecture: what every export writes."""

from __future__ import annotations

import numpy as np

from ..adapters import merge_lora
from ..runtime.program import Program
from ..scheme import Scheme

ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def lora_of(program: Program):
    """The LoRA settings the step was compiled with, or None."""
    return Scheme.from_dict(program.layout.scheme).lora if program.layout.scheme else None


def fine_tuned_state(program: Program) -> dict[str, np.ndarray]:
    """The program's parameters under their source names, LoRA adapters merged into their weights
    (the original architecture); non-finite values are refused, naming the tensor."""
    state = program.state_dict()
    lora = lora_of(program)
    if lora is not None:
        state = merge_lora(state, lora)
    bad = sorted(k for k, v in state.items() if not np.all(np.isfinite(v)))
    if bad:
        raise ValueError(f"refusing to export non-finite parameters: {bad[:4]} (a diverged fine-tune)")
    return state
