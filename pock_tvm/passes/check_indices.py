"""CheckIndices: every index a kernel reads memory at is checked at run time, where it is used."""

from __future__ import annotations

import functools
import logging
import math

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.script import tirx as T

from ..calling import INDEX_ERROR
from .utils import with_functions

logger = logging.getLogger(__name__)

# Every op whose kernel reads or writes at a data-dependent position, as
# op name -> (argument holding the indices, how the bound follows from the call).
# TVM's kernels for these do no bound check ("fast" mode): an index outside reads or writes outside
# the tensor (a segfault, or garbage).
INDEX_OPS = {
    "relax.take": (1, lambda call: _axis_extent(call.args[0], call.attrs.axis)),
    "relax.gather_elements": (1, lambda call: _axis_extent(call.args[0], call.attrs.axis)),
    "relax.scatter_elements": (1, lambda call: _axis_extent(call.args[0], call.attrs.axis)),
    "relax.nn.nll_loss": (1, lambda call: _axis_extent(call.args[0], 1 if len(call.args[0].ty.shape) > 1 else 0)),
}

# The prefix of every message a failed check raises (Program turns those into ValueError).
MESSAGE_PREFIX = INDEX_ERROR


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.CheckIndices")
class CheckIndices:
    """Reads every Relax function; in front of each op of :data:`INDEX_OPS` whose indices are not a
    constant, inserts ``checked = call_tir(check, indices)``: a kernel that copies the indices and
    raises ``pock_tvm: index out of range ...`` (naming the op, the table and the function inputs
    the indices come from) at the first one outside ``[0, extent)`` (``nll_loss``: or its
    ``ignore_index``). The op then reads ``checked``. ``names`` maps Relax variable names (inputs,
    parameters) to the names the user knows (``input_ids``, ``model.embed_tokens.weight``). One check per (indices, bound); indices with
    a symbolic shape or extent are left alone.

    A bound on the inputs (token ids below the vocabulary) cannot cover indices the graph computes:
    ``emb(ids + 1)``, or OPT's positions ``cumsum(attention_mask) * attention_mask``. The check sits
    where the index is used, so it holds in Python, in the runner and over RPC alike, and the
    manifest cannot switch it off. It runs before any parameter is updated (indices are read in the
    forward pass), so a failed step changes nothing. The kernel is opaque (never fused) and counts
    as scheduled (scheduling passes leave it alone); it costs one pass over the indices.

    CPU targets only: the assertion compiles to host code that sets the error; TVM's device code
    cannot raise, so the pipeline leaves CUDA steps without it (their inputs and labels are checked).
    """

    def __init__(self, names: dict[str, str] | None = None):
        self.names = dict(names or {})  # {Relax variable name: the user's name} for the messages

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rewriter = _Checker(mod, func, self.names)
                new = rewriter.visit_expr(func)
                if rewriter.count:
                    updates[gvar] = new
                    logger.debug("CheckIndices: %d index checks in %s", rewriter.count, gvar.name_hint)
                mod = rewriter.builder_.get()
        return with_functions(mod, updates)


def _axis_extent(data: relax.Expr, axis) -> int | None:
    shape = getattr(data.ty, "shape", None)
    if shape is None:
        return None
    dims = list(shape)
    if axis is None:  # take over the flattened tensor
        return math.prod(int(d) for d in dims) if all(isinstance(d, tvm.tirx.IntImm) for d in dims) else None
    extent = dims[int(axis) % len(dims)]
    return int(extent) if isinstance(extent, tvm.tirx.IntImm) else None


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        return None
    return tuple(int(d) for d in shape)


@functools.lru_cache(maxsize=256)
def index_check_kernel(shape: tuple[int, ...], dtype: str, bound: int, extra: int | None, message: str):
    """A PrimFunc ``(indices, checked)``: copies ``indices`` and asserts each lies in ``[0, bound)``
    or equals ``extra``; ``message`` is the error. Remembered per arguments (parsing TVMScript
    costs ~30 ms, and every compile of a model asks for the same checks)."""
    n = max(math.prod(shape), 1)
    tir_shape = [T.int64(d) for d in shape]
    zero, top = tvm.tirx.const(0, dtype), tvm.tirx.const(bound, dtype)
    # in range, or the one value let through (nll_loss's ignore_index; without one, a value the
    # range test already passes, so it lets nothing else through)
    other = tvm.tirx.const(0 if extra is None else extra, dtype)

    @T.prim_func(private=True, check_well_formed=False)
    def check(a: T.Buffer(tir_shape, dtype), out: T.Buffer(tir_shape, dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        with T.sblock("root"):
            flat_a = T.decl_buffer((n,), dtype, data=a.data)
            flat_out = T.decl_buffer((n,), dtype, data=out.data)
            for i in range(T.int64(n)):
                assert (flat_a[i] >= zero and flat_a[i] < top) or flat_a[i] == other, message
                flat_out[i] = flat_a[i]
    return check


def _sources(func: relax.Function, var: relax.Var) -> list[str]:
    """Names of ``func``'s parameters that ``var`` is computed from."""
    producers = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            producers[binding.var] = binding.value
    params = {p: p.name for p in func.params}
    seen, found, stack = set(), [], [var]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in params:
            found.append(params[v])
        elif v in producers:
            relax.analysis.post_order_visit(producers[v], lambda e: stack.append(e)
                                            if isinstance(e, relax.Var) else None)
    return sorted(found)


def _describe(op: str, call: relax.Call, bound: int, sources: list[str], extra: int | None,
              names: dict[str, str]) -> str:
    table = f"'{names.get(call.args[0].name, call.args[0].name)}'" if isinstance(call.args[0], relax.Var) \
        else "a frozen table"
    what = {"relax.take": f"take from {table} ({bound} rows along the axis)",
            "relax.gather_elements": f"gather from {table} ({bound} along the axis)",
            "relax.scatter_elements": f"scatter into {table} ({bound} along the axis)",
            "relax.nn.nll_loss": f"the loss over {bound} classes"}[op]
    allowed = f"[0, {bound})" + (f" or {extra} (ignored)" if extra is not None else "")
    sources = [names.get(n, n) for n in sources]
    origin = f"computed from the input(s) {', '.join(sources)}" if sources else "computed in the graph"
    fix = ("fix the labels" if op == "relax.nn.nll_loss" else
           "check the inputs' values (token ids below the vocabulary, attention masks of 0 and 1)")
    return f"{MESSAGE_PREFIX} in {what}: an index {origin} lies outside {allowed}; {fix}"


@mutator
class _Checker(PyExprMutator):
    def __init__(self, mod, func, names: dict[str, str]):
        super().__init__(mod)
        self.func = func
        self.names = names
        self.count = 0
        self.checked: dict[tuple, relax.Var] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        op = getattr(call.op, "name", "")
        if op not in INDEX_OPS:
            return call
        position, bound_of = INDEX_OPS[op]
        indices = call.args[position]
        shape, dtype = _static_shape(indices), getattr(indices.ty, "dtype", None)
        bound = bound_of(call)
        if isinstance(indices, tvm.ir.expr.Constant) or shape is None or bound is None or dtype not in ("int32", "int64"):
            return call
        extra = int(call.attrs.ignore_index) if op == "relax.nn.nll_loss" else None
        key = (indices, bound, extra)
        if key not in self.checked:
            sources = _sources(self.func, indices) if isinstance(indices, relax.Var) else []
            kernel = index_check_kernel(shape, dtype, bound, extra, _describe(op, call, bound, sources, extra, self.names))
            gvar = self.builder_.add_func(kernel, "check_index")
            self.checked[key] = self.builder_.emit(
                relax.call_tir(gvar, (indices,), relax.TensorType(list(shape), dtype)), "checked_index")
            self.count += 1
        args = list(call.args)
        args[position] = self.checked[key]
        return relax.Call(call.op, args, call.attrs, call.ty_args)
