"""Small rewriting helpers shared by the passes."""

from __future__ import annotations

from tvm import relax


def vars_in(expr) -> set[relax.Var]:
    """Every variable ``expr`` reads."""
    found: set[relax.Var] = set()
    relax.analysis.post_order_visit(expr, lambda e: found.add(e) if isinstance(e, relax.Var) else None)
    return found


def substitute(expr, remap: dict[relax.Var, relax.Expr]):
    """``expr`` with variables replaced (binding values: calls, tuples, tuple items)."""
    if isinstance(expr, relax.Var):
        return remap.get(expr, expr)
    if isinstance(expr, relax.Call):
        args = [substitute(a, remap) for a in expr.args]
        return relax.Call(expr.op, args, expr.attrs, expr.ty_args)
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(substitute(expr.tuple_value, remap), expr.index)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([substitute(f, remap) for f in expr.fields])
    return expr


def with_functions(mod, updates: dict):
    """A copy of ``mod`` (same attributes) with the functions of ``updates`` (``{GlobalVar or
    name: func}``) replaced or added; ``mod`` itself when there is nothing to replace. The one way
    passes rebuild a module: a Relax function a pass rebuilt by hand (``relax.Function(params,
    SeqExpr(...))``) gets its types here, as if the block builder had made it."""
    if not updates:
        return mod
    import tvm

    new = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    for key, func in updates.items():
        new[key] = relax.BlockBuilder(new).normalize(func) if isinstance(func, relax.Function) else func
    return new


# The attribute TVM 0.27 puts on a kernel that has a schedule (DLight, MetaSchedule's database);
# scheduling passes skip such kernels and set it on the ones they schedule.
SCHEDULED = "tirx.is_scheduled"


def is_scheduled(func) -> bool:
    return bool(func.attrs) and SCHEDULED in func.attrs and bool(func.attrs[SCHEDULED])


def host_array(tensor):
    """A host TVM tensor as a C-contiguous numpy array over the same memory (no copy, for reading:
    hashing the bytes of large frozen weights), or a copy where it cannot be shared."""
    import numpy as np

    data = np.from_dlpack(tensor) if tensor.device.dlpack_device_type() == 1 else tensor.numpy()
    return data if data.flags.c_contiguous else np.ascontiguousarray(data)


def byte_view(array) -> memoryview:
    """The bytes of a C-contiguous numpy array, without copying them."""
    return memoryview(array.reshape(-1)).cast("B")
