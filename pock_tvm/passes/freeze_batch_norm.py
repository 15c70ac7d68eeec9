"""FreezeBatchNorm: rewrite eval-mode BatchNorm of ``forward`` into differentiable primitives."""

from __future__ import annotations

import tvm
from tvm import relax

from ..analysis.layers import bindings


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.FreezeBatchNorm")
class FreezeBatchNorm:
    """Reads ``forward``; returns it with every ``batch_norm`` expanded into arithmetic.

    BatchNorm is frozen: running statistics are fixed inputs (the importer exported the model in
    eval mode), only its affine weight and bias can receive gradients. Relax autodiff has no
    batch_norm rule and ``DecomposeOpsForTraining`` ignores ``training=False``, so the inference
    decomposition is used. Must run before ``SplitPartialChannels`` and ``AppendLoss``.
    """

    def __init__(self, func_name: str = "forward"):
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for binding in bindings(mod[self.func_name]):
            value = binding.value
            if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.nn.batch_norm":
                if bool(value.attrs.training):
                    raise ValueError(
                        "FreezeBatchNorm: found batch_norm(training=True); import the model in "
                        "eval mode (model.eval()) so BatchNorm uses its running statistics"
                    )
        return relax.transform.DecomposeOpsForInference(self.func_name)(mod)
