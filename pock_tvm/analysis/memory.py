"""Bytes a lowered step allocates, read off the storage that static memory planning created."""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax


def planned_bytes(lowered: tvm.IRModule, func_name: str = "train_step") -> dict[str, int]:
    """``{"storage": bytes, "dynamic": count}`` of ``R.vm.alloc_storage`` in ``func_name`` and the
    Relax functions it calls: after ``StaticPlanBlockMemory`` every tensor the step creates
    (intermediates, gradients, new parameters) lives in one of these blocks, reused by liveness.
    ``dynamic`` counts allocations whose size is not a compile-time constant."""
    total, dynamic, seen = 0, 0, set()

    def visit_func(name: str) -> None:
        nonlocal total, dynamic
        if name in seen:
            return
        seen.add(name)

        def visit(expr) -> None:
            nonlocal total, dynamic
            if not isinstance(expr, relax.Call):
                return
            if isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.vm.alloc_storage":
                shape = expr.args[0]
                try:
                    total += int(shape.values[0])
                except (AttributeError, TypeError, ValueError):
                    dynamic += 1
            elif isinstance(expr.op, relax.GlobalVar) and isinstance(lowered[expr.op], relax.Function):
                visit_func(expr.op.name_hint)

        relax.analysis.post_order_visit(lowered[name].body, visit)

    visit_func(func_name)
    return {"storage": total, "dynamic": dynamic}


def kernel_workspace(lowered: tvm.IRModule) -> dict[str, int]:
    """``{"peak": bytes, "kernel": name}``: the largest scratch memory one kernel allocates for its
    own intermediates (e.g. a padded input, a conv result before its fused epilogue). Kernels run
    one at a time, so the step needs the largest of them on top of its planned storage."""
    peak, name = 0, ""
    for gvar, func in lowered.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or not hasattr(func.body, "block"):
            continue
        # unscheduled kernels (legalized, fused) declare every intermediate on their root block
        size = sum(math.prod(int(d) for d in buf.shape) * np.dtype(str(buf.dtype)).itemsize
                   for buf in func.body.block.alloc_buffers)
        if size > peak:
            peak, name = size, gvar.name_hint
    return {"peak": peak, "kernel": name}

