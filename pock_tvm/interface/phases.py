"""Planned memory of a training step after each optimization phase (no code generation)."""

from __future__ import annotations

import logging

import tvm

from ..analysis.cost import training_cost
from ..analysis.memory import kernel_workspace, planned_bytes
from ..passes.pipeline import pock_tvm_pipeline

logger = logging.getLogger(__name__)

# cumulative: each phase adds one optimization to the previous one
PHASES = [
    ("autodiff only", {}),
    ("+ fold frozen", {"fold_frozen": True}),
    ("+ reorder updates", {"reorder_updates": True}),
    ("+ in-place updates", {"in_place": True}),
    ("+ inline kernel scratch", {"inline_intermediates": True}),
]
ALL_OFF = {"fold_frozen": False, "reorder_updates": False, "in_place": False, "inline_intermediates": False}


def memory_by_phase(build, trainable: list[str], param_bytes: int, state_bytes: int,
                    target: tvm.target.Target) -> list[dict]:
    """One row per phase: bytes of parameters, optimizer state, saved activations, gradients, the
    step's planned storage, the largest kernel scratch, and the planned peak (the sum of
    parameters, state, storage and scratch). ``build(**settings)`` returns the training graph."""
    rows, settings = [], dict(ALL_OFF)
    for name, change in PHASES:
        settings.update(change)
        train_mod = build(**settings)
        cost = training_cost(train_mod, trainable)
        with target, tvm.transform.PassContext(opt_level=3):
            lowered = pock_tvm_pipeline(build_training_graph=False, **settings)(train_mod)
        storage = planned_bytes(lowered)["storage"]
        scratch = kernel_workspace(lowered)["peak"]
        rows.append({"phase": name, "parameters": param_bytes, "optimizer_state": state_bytes,
                     "saved_activations": cost.saved_activation_bytes, "gradients": cost.gradient_bytes,
                     "step_storage": storage, "kernel_scratch": scratch,
                     "peak": param_bytes + state_bytes + storage + scratch})
        logger.info("memory after phase %r: %d bytes planned peak", name, rows[-1]["peak"])
    return rows
