"""Training loops over a compiled :class:`~pock_tvm.runtime.program.Program` (no compiler needed)."""

from .finetune import accuracy, fit, predict

__all__ = ["accuracy", "fit", "predict"]
