"""Bytes a lowered step allocates, read off the storage that static memory planning created."""

from __future__ import annotations

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
    one at a time, so the step needs the largest of them on top of its planned storage.

    Read after TIR's own buffer compaction (the passes ``tvm.compile`` runs first): a schedule
    that computes a stage inside a loop nest declares the whole buffer but allocates only the
    region one iteration touches (a register tile, one row). Registers (``local``) are not
    counted; an allocation inside a parallel loop counts once, not once per thread. Where TVM's
    compaction fails on a kernel (seen on a batch-1 conv schedule: a division by zero), its
    buffers count whole, an upper bound."""
    from tvm.s_tir import transform as s_tir
    from tvm.s_tir.analysis import calculate_allocated_bytes

    def lowering(compact: bool):
        return tvm.transform.Sequential([s_tir.LowerInitBlock(), s_tir.PlanAndUpdateBufferAllocationLocation(),
                                         s_tir.ConvertBlocksToOpaque(),
                                         *([s_tir.CompactBufferAllocation()] if compact else []),
                                         s_tir.LowerOpaqueBlock(), tvm.tirx.transform.FlattenBuffer()])

    peak, name = 0, ""
    for gvar, func in lowered.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        try:
            sizes = calculate_allocated_bytes(lowering(True)(tvm.IRModule({"main": func})))["main"]
        except tvm.error.InternalError:  # compaction fails on some batch-1 schedules: count whole buffers
            sizes = calculate_allocated_bytes(lowering(False)(tvm.IRModule({"main": func})))["main"]
        size = int(sizes.get("global", 0))
        if size > peak:
            peak, name = size, gvar.name_hint
    return {"peak": peak, "kernel": name}
