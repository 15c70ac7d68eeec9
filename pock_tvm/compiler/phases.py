"""Planned memory of a training step after each optimization phase (no code generation)."""

from __future__ import annotations

import logging
from dataclasses import replace

import tvm

from ..analysis.cost import training_cost
from ..analysis.memory import kernel_workspace, planned_bytes
from ..options import NONE
from ..passes.pipeline import pock_tvm_pipeline

logger = logging.getLogger(__name__)

# cumulative: each phase adds one optimization to the previous one
PHASES = [
    ("autodiff only", None),
    ("+ fold frozen", "fold_frozen"),
    ("+ reorder updates", "reorder_updates"),
    ("+ in-place updates", "in_place"),
    ("+ inline kernel scratch", "inline_intermediates"),
]


def memory_by_phase(build, trainable: list[str], param_bytes: int, state_bytes: int,
                    target: tvm.target.Target, conv_layouts: dict | None = None) -> list[dict]:
    """One row per phase: bytes of parameters, optimizer state, saved activations, gradients, the
    step's planned storage, the largest kernel scratch, and the planned peak (the sum of
    parameters, state, storage and scratch). ``build(options)`` returns the training graph."""
    rows, options = [], NONE
    for name, change in PHASES:
        if change:
            options = replace(options, **{change: True})
        train_mod = build(options)
        cost = training_cost(train_mod, trainable)
        with target, tvm.transform.PassContext(opt_level=3):
            lowered = pock_tvm_pipeline(build_training_graph=False, options=options,
                                        conv_layouts=conv_layouts)(train_mod)
        storage = planned_bytes(lowered)["storage"]
        scratch = kernel_workspace(lowered)["peak"]
        rows.append({"phase": name, "parameters": param_bytes, "optimizer_state": state_bytes,
                     "saved_activations": cost.saved_activation_bytes, "gradients": cost.gradient_bytes,
                     "step_storage": storage, "kernel_scratch": scratch,
                     "peak": param_bytes + state_bytes + storage + scratch})
        logger.info("memory after phase %r: %d bytes planned peak", name, rows[-1]["peak"])
    return rows
