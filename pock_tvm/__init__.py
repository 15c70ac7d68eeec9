"""pock_tvm: compile an inference model into a sparse, ahead-of-time training step on TVM.

``import pock_tvm`` stays light (numpy + the TVM runtime for :func:`load`); the compiler, its
frontends and torch load on first use of :func:`compile` or the other compile-time names.
"""

from __future__ import annotations

import importlib

from .runtime.program import Program

load = Program.load

_LAZY = {
    "compile": ("pock_tvm.interface.compiler", "compile"),
    "Scheme": ("pock_tvm.scheme", "Scheme"),
    "Rule": ("pock_tvm.scheme", "Rule"),
    "SGD": ("pock_tvm.optim", "SGD"),
    "Adam": ("pock_tvm.optim", "Adam"),
    "AdamW": ("pock_tvm.optim", "AdamW"),
    "CrossEntropy": ("pock_tvm.loss", "CrossEntropy"),
    "MSE": ("pock_tvm.loss", "MSE"),
    "TorchLoss": ("pock_tvm.loss", "TorchLoss"),
    "passes": ("pock_tvm.passes", None),
    "loss": ("pock_tvm.loss", None),
    "optim": ("pock_tvm.optim", None),
}

__all__ = ["MSE", "SGD", "Adam", "AdamW", "CrossEntropy", "Program", "Rule", "Scheme", "TorchLoss",
           "compile", "load", "passes"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pock_tvm' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
