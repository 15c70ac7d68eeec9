"""pock_tvm: compile an inference model into a sparse, ahead-of-time training step on TVM.

``import pock_tvm`` stays light: TVM loads on first use of :func:`load` / :class:`Program`, the
compiler, its frontends and torch on first use of :func:`compile` or the other compile-time names
(so ``pock_tvm.models`` can be used beside plain torch without loading TVM).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Program": ("pock_tvm.runtime.program", "Program"),
    "load": ("pock_tvm.runtime.program", "load_program"),
    "compile": ("pock_tvm.compiler.step", "compile"),
    "check_parity": ("pock_tvm.compiler.parity", "check_parity"),
    "Scheme": ("pock_tvm.scheme", "Scheme"),
    "Rule": ("pock_tvm.scheme", "Rule"),
    "SGD": ("pock_tvm.optim", "SGD"),
    "Adam": ("pock_tvm.optim", "Adam"),
    "AdamW": ("pock_tvm.optim", "AdamW"),
    "CrossEntropy": ("pock_tvm.loss", "CrossEntropy"),
    "MSE": ("pock_tvm.loss", "MSE"),
    "NextTokenCrossEntropy": ("pock_tvm.loss", "NextTokenCrossEntropy"),
    "TorchLoss": ("pock_tvm.loss", "TorchLoss"),
    "passes": ("pock_tvm.passes", None),
    "loss": ("pock_tvm.loss", None),
    "optim": ("pock_tvm.optim", None),
}

__all__ = ["MSE", "SGD", "Adam", "AdamW", "CrossEntropy", "Program", "Rule", "Scheme", "TorchLoss",
           "check_parity", "compile", "load", "passes"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pock_tvm' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
