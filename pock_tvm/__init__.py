"""pock_tvm: compile an inference model into a sparse, ahead-of-time training step on TVM."""

from . import passes  # registers the gradient rules and the "pock_tvm" pipeline
from .interface.compiler import compile
from .loss import MSE, CrossEntropy, TorchLoss
from .optim import SGD, Adam, AdamW
from .runtime.program import Program
from .scheme import Rule, Scheme

load = Program.load

__all__ = ["MSE", "SGD", "Adam", "AdamW", "CrossEntropy", "Program", "Rule", "Scheme", "TorchLoss",
           "compile", "load", "passes"]
__version__ = "0.1.0"
