"""SparseGradient: reverse-mode autodiff w.r.t. the updated parameters only."""

from __future__ import annotations

import tvm
from tvm import relax


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.SparseGradient")
class SparseGradient:
    """Reads ``loss`` and the names of its trainable parameters; creates ``loss_adjoint``.

    ``loss_adjoint`` returns ``(loss, (grad_0, ...))`` in the order of ``trainable``. Relax's
    ``Gradient`` only emits adjoints that a requested gradient needs, so this is where the sparse
    backward takes shape: frozen weights get no weight-gradient op, layers below the lowest updated
    one get no input-gradient op, and a split weight (``SplitPartialChannels``) gets the gradient
    of its updated channels only. Requires ``AppendLoss``; run ``CheckGradientRules`` first for a
    readable error on ops without a rule.
    """

    def __init__(self, trainable: list[str] | None = None, func_name: str = "loss"):
        self.trainable = list(trainable or [])
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not self.trainable:
            raise ValueError("SparseGradient: the scheme updates no parameter; select at least one "
                             "(e.g. the preset 'bias-only' or a rule with mode 'full')")
        params = {p.name: p for p in mod[self.func_name].params}
        unknown = [n for n in self.trainable if n not in params]
        if unknown:
            raise ValueError(f"SparseGradient: {unknown} are not parameters of {self.func_name}")
        require = [params[n] for n in self.trainable]
        return relax.transform.Gradient(self.func_name, require_grads=require)(mod)
