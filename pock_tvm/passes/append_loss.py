"""AppendLoss: ``loss(inputs..., params..., target) = L(forward(inputs, params), target)``."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.training import AppendLoss as _RelaxAppendLoss


@tvm.transform.module_pass(opt_level=0, name="pock_tvm.AppendLoss")
class AppendLoss:
    """Reads ``forward`` and a loss function ``(prediction, target) -> scalar``; creates ``loss``.

    ``loss`` inlines both into a single dataflow block (what ``Gradient`` needs) and takes the
    inputs and parameters of ``forward`` followed by the target. ``forward`` is kept for
    inference. Runs after ``SplitPartialChannels``, before ``SparseGradient``.
    """

    def __init__(self, loss_function: relax.Function | None = None, func_name: str = "forward",
                 new_func_name: str = "loss"):
        self.loss_function = loss_function
        self.func_name = func_name
        self.new_func_name = new_func_name

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if self.loss_function is None:
            raise ValueError("AppendLoss: no loss function given; pass loss_function=...")
        ret = self.loss_function.ret_ty
        if not isinstance(ret, relax.TensorType) or len(ret.shape) != 0:
            raise ValueError(f"AppendLoss: the loss must return a scalar tensor, it returns {ret}")
        func = mod[self.func_name]
        mod = _RelaxAppendLoss(self.func_name, self.loss_function, 1, self.new_func_name)(mod)
        new = mod[self.new_func_name]
        for key in ("pock_tvm.partial",):
            if func.attrs and key in func.attrs:
                new = new.with_attr(key, func.attrs[key])
        mod[self.new_func_name] = new.without_attr("num_input")
        return mod
