"""BindFrozenParams: frozen parameters become constants of the compiled step."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.BindFrozenParams")
class BindFrozenParams:
    """Reads ``forward`` and ``values = {param name: array}`` of parameters the scheme freezes
    (frozen halves of split weights as ``W__frz``, BatchNorm statistics); binds each as a constant
    and drops it from the signature.

    Frozen tensors never change, so the step needs not receive them: what depends only on them
    (``FoldBatchNorm``, then ``FoldConstant`` after legalization) is computed once at compile
    time, and the runtime passes fewer arguments. Runs after ``SplitPartialChannels`` and before
    ``FoldBatchNorm`` and ``AppendLoss``. A name that is trainable or not a parameter is an error.
    """

    def __init__(self, values: dict[str, np.ndarray] | None = None,
                 trainable: list[str] | None = None, func_name: str = "forward"):
        self.values = dict(values or {})
        self.trainable = set(trainable or [])
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not self.values:
            return mod
        params = {p.name: p for p in mod[self.func_name].params}
        clash = sorted(set(self.values) & self.trainable)
        if clash:
            raise ValueError(f"BindFrozenParams: {clash} are trainable; bind only frozen tensors")
        missing = sorted(set(self.values) - set(params))
        if missing:
            raise ValueError(f"BindFrozenParams: {missing} are not parameters of {self.func_name}; "
                             "bind after SplitPartialChannels with the split names (W__frz)")
        for name, value in self.values.items():
            ty = params[name].ty
            expected = tuple(int(d) for d in ty.shape)
            if tuple(value.shape) != expected or str(value.dtype) != str(ty.dtype):
                raise ValueError(f"BindFrozenParams: {name} is {ty.dtype}{list(expected)} in the "
                                 f"model but the value is {value.dtype}{list(value.shape)}")
        consts = {name: np.require(value, requirements="C") for name, value in self.values.items()}
        return relax.transform.BindParams(self.func_name, consts)(mod)
