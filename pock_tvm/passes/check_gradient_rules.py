"""CheckGradientRules: fail early, with the source node, on ops autodiff cannot differentiate."""

from __future__ import annotations

import tvm
from tvm import relax

from ..analysis.layers import bindings
from .gradient_rules import gradient_rules_installed, has_gradient_rule
from .utils import vars_in

# ops that make no gradient flow through them, whatever they read
_NO_FLOW = {"relax.shape_of"}


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.CheckGradientRules")
class CheckGradientRules:
    """Reads ``func_name`` and the names of the trainable parameters; changes nothing.

    Every op whose result depends on a trainable parameter lies on the backward path and needs an
    ``FPrimalGradient`` rule. Without one, Relax's ``Gradient`` fails deep inside C++; this pass
    raises a ``ValueError`` that names the op, its Relax variable and the source node it came from
    (``origins``, as recorded by the frontend). Runs after ``SplitPartialChannels`` on
    ``forward``, and again after ``AppendLoss`` on ``loss`` (``func_name="loss"``): a loss written in
    torch (``TorchLoss``) brings ops of its own (``F.cross_entropy`` on flattened logits: a gather).
    """

    def __init__(self, trainable: list[str] | None = None, origins: dict[str, str] | None = None,
                 func_name: str = "forward"):
        self.trainable = list(trainable or [])
        self.origins = dict(origins or {})
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with gradient_rules_installed():  # pock_tvm's rules, for this pass only
            return self._transform(mod, ctx)

    def _transform(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        tainted = set(self.trainable)
        missing = []
        for binding in bindings(mod[self.func_name]):
            value = binding.value
            if not {v.name for v in vars_in(value)} & tainted:
                continue
            tainted.add(binding.var.name)
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                if value.op.name not in _NO_FLOW and not has_gradient_rule(value.op.name):
                    missing.append((value.op.name, binding.var.name))
        if missing:
            unknown = "the loss function" if self.func_name == "loss" else "an unknown source node"
            lines = [f"  {op} -> {var}, from {self.origins.get(var, unknown)}" for op, var in missing[:10]]
            raise ValueError(
                "CheckGradientRules: no gradient rule for these ops between the updated parameters "
                "and the loss:\n" + "\n".join(lines) + "\nRegister a rule in "
                "pock_tvm/passes/gradient_rules.py (GRADIENT_RULES), or freeze the layers above them."
            )
        return mod
