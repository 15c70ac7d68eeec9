"""Build training graphs (no codegen) and read their backward ops, for structural tests."""

from __future__ import annotations

import tvm
from tvm import relax

import pock_tvm
from pock_tvm.analysis.cost import adjoint_parts
from pock_tvm.compiler.step import build_training_graph, plan
from pock_tvm.options import PipelineOptions


def training_graph(imported, scheme, optimizer="sgd", options=PipelineOptions(fold_frozen=False),
                   frozen_values=None):
    updates = pock_tvm.Scheme.load(scheme).resolve(imported)
    _, trainable, partial = plan(imported, updates)
    mod = build_training_graph(imported, trainable, partial, pock_tvm.loss.make_loss("ce"),
                               pock_tvm.optim.make_optimizer(optimizer), options, frozen_values)
    return mod, trainable


def backward_calls(mod) -> list[relax.Call]:
    """Op calls of the backward part of the adjoint."""
    _, backward = adjoint_parts(mod)
    return [b.value for b in backward if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]
