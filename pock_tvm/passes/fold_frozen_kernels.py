"""FoldFrozenKernels: kernels of constants only run once at compile time, remembered across compiles."""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import OrderedDict

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .utils import byte_view, host_array, with_functions

logger = logging.getLogger(__name__)

# what one process keeps between compiles: folded results up to this many bytes, and built kernels
RESULT_BYTES = 256 << 20
BUILT_KERNELS = 1024
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


class FoldMemo:
    """Built constant-evaluation kernels (by structural equality) and their results (by kernel and
    the bytes of every argument), least recently used dropped first. One per process
    (:data:`MEMO`); :meth:`clear` empties it."""

    def __init__(self, result_bytes: int = RESULT_BYTES, kernels: int = BUILT_KERNELS):
        self.result_bytes, self.kernel_limit = result_bytes, kernels
        self.kernels: OrderedDict[int, list] = OrderedDict()  # structural hash -> [(func, callable, serial)]
        self.results: OrderedDict[tuple, tvm.runtime.Tensor] = OrderedDict()  # never written after
        self.held = 0
        self.hits = self.misses = 0
        self.serials = itertools.count()

    def clear(self) -> None:
        self.kernels.clear()
        self.results.clear()
        self.held = self.hits = self.misses = 0

    def kernel(self, func: tvm.tirx.PrimFunc):
        """``(serial, callable)`` of ``func`` built for the plain ``llvm`` target (what
        ``relax.transform.FoldConstant`` evaluates with); the callable is None where it cannot build.
        The serial names this kernel alone (structurally equal ones share it; two kernels of one
        hash do not), and is never given again after the kernel leaves the memo: results are keyed by it."""
        digest = tvm_ffi.structural_hash(func)
        bucket = self.kernels.setdefault(digest, [])
        self.kernels.move_to_end(digest)
        for known, built, serial in bucket:
            if tvm_ffi.structural_equal(known, func):
                return serial, built
        try:
            module = tvm.tirx.build(func.with_attr("global_symbol", "fold"), target="llvm")
            built = module["fold"]
        except (RuntimeError, ValueError, TypeError) as err:  # TVM errors; e.g. a GPU kernel: left to run in the step
            logger.debug("FoldFrozenKernels: cannot build a kernel on the host (%s); not folded", err)
            built = None
        serial = next(self.serials)
        bucket.append((func, built, serial))
        while len(self.kernels) > self.kernel_limit:
            self.kernels.popitem(last=False)
        return serial, built

    def result(self, key: tuple) -> tvm.runtime.Tensor | None:
        found = self.results.get(key)
        if found is not None:
            self.results.move_to_end(key)
            self.hits += 1
        return found

    def keep(self, key: tuple, value: tvm.runtime.Tensor) -> None:
        self.misses += 1
        if _nbytes(value) > self.result_bytes:
            return
        self.results[key] = value
        self.held += _nbytes(value)
        while self.held > self.result_bytes:
            _, dropped = self.results.popitem(last=False)
            self.held -= _nbytes(dropped)


def _nbytes(tensor: tvm.runtime.Tensor) -> int:
    return int(np.prod(tensor.shape)) * np.dtype(str(tensor.dtype)).itemsize


MEMO = FoldMemo()


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.FoldFrozenKernels")
class FoldFrozenKernels:
    """In every Relax function, replaces ``call_tir(kernel, (constants...))`` (one tensor output of a
    static shape, at least one input and all of them constants, no symbolic arguments) by the constant it computes, in binding order, so chains
    fold too: frozen weights (``BindFrozenParams``) through their transposes, flips and layout
    transforms. The same evaluation as ``relax.transform.FoldConstant`` (the kernel unscheduled,
    built for plain ``llvm``), so the folded bytes are the same; it differs in keeping what it
    built and computed in ``memo`` (default :data:`MEMO`, bounded): the options of a scheme search
    or the compiles of one session fold each frozen tensor once, not once per compile and per
    function. Runs after ``LegalizeOps``; ``FoldConstant`` after it folds what remains (shapes,
    tuple outputs). A kernel that cannot be built on the host is left in the step."""

    def __init__(self, memo: FoldMemo | None = None):
        self.memo = memo if memo is not None else MEMO

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        digests: dict[tuple, str] = {}  # (data pointer, shape, dtype) -> bytes digest, this run
        made: dict[tuple, tvm.ir.GenericConst] = {}  # result key -> its constant, shared by the functions
        for gvar, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function):
                continue
            folder = _Folder(mod, self.memo, digests, made)
            new = folder.visit_expr(func)
            if folder.folded:
                updates[gvar] = relax.analysis.remove_all_unused(new)
                logger.debug("FoldFrozenKernels: %d kernels folded in %s", folder.folded, gvar.name_hint)
        return with_functions(mod, updates)


@mutator
class _Folder(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, memo: FoldMemo, digests: dict, made: dict):
        super().__init__(mod)
        self.mod, self.memo = mod, memo
        self.folded = 0
        self.digests, self.made = digests, made

    def visit_var_(self, var):
        bound = self.lookup_binding(var)
        return bound if isinstance(bound, tvm.ir.GenericConst) else var

    visit_dataflow_var_ = visit_var_

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        folded = self._fold(call) if call.op.same_as(_CALL_TIR) else None
        return call if folded is None else folded

    def _fold(self, call):
        if len(call.args) != 2 or not isinstance(call.args[1], relax.Tuple) or len(call.ty_args) != 1:
            return None
        func = self.mod[call.args[0]] if isinstance(call.args[0], tvm.ir.GlobalVar) else None
        args = list(call.args[1].fields)
        out = call.ty_args[0]
        if not isinstance(func, tvm.tirx.PrimFunc) or not args or \
                not all(isinstance(a, tvm.ir.GenericConst) for a in args):
            return None  # (a kernel of no inputs, e.g. zeros, stays: it would only become a large constant)
        shape = getattr(out, "shape", None)
        if shape is None or not isinstance(shape, relax.ShapeExpr) or \
                not all(isinstance(d, tvm.tirx.IntImm) for d in shape.values):
            return None
        shape = tuple(int(d) for d in shape.values)
        serial, built = self.memo.kernel(func)
        if built is None:
            return None
        key = (serial, str(out.dtype), shape, *(self._digest(a.value) for a in args))
        self.folded += 1
        if key in self.made:  # the same fold in another function of this module: one constant
            return self.made[key]
        value = self.memo.result(key)
        if value is None:
            value = tvm.runtime.empty(shape, str(out.dtype), tvm.cpu())
            built(*(a.value for a in args), value)
            self.memo.keep(key, value)
        self.made[key] = relax.const(value, str(out.dtype))  # wraps the tensor, no copy
        return self.made[key]

    def _digest(self, array) -> str:
        where = (array.data_ptr(), tuple(array.shape), str(array.dtype))
        if where not in self.digests:
            self.digests[where] = tensor_digest(array)
        return self.digests[where]


def tensor_digest(tensor) -> str:
    """A digest of a host tensor's dtype, shape and bytes, read in place (no copy)."""
    data = host_array(tensor)
    digest = hashlib.blake2b(byte_view(data), digest_size=16).hexdigest()
    return digest + f"{data.dtype}{data.shape}"
