"""Losses appended to the model at compile time.

Each loss knows the spec of its target tensor and builds a Relax function
``loss(prediction, target) -> scalar`` with one dataflow block, which ``AppendLoss`` inlines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tvm import relax
from tvm.relax.training import loss as relax_loss

from .frontend.model import TensorSpec


def _tensor_type(spec: TensorSpec) -> relax.TensorType:
    return relax.TensorType(spec.shape, spec.dtype)


def _target_var(spec: TensorSpec) -> relax.Var:
    """The loss function's target parameter, under the spec's name (what the compiled step calls it)."""
    return relax.Var(spec.name, _tensor_type(spec))


@dataclass
class CrossEntropy:
    """Softmax cross-entropy on integer class labels (``F.cross_entropy``, mean reduction)."""

    name: str = "cross_entropy"

    def target_spec(self, output: TensorSpec) -> TensorSpec:
        if len(output.shape) != 2:
            raise ValueError(f"CrossEntropy: needs (batch, classes) logits, the model returns {output.shape}")
        return TensorSpec("target", (output.shape[0],), "int64")

    def relax_function(self, output: TensorSpec) -> relax.Function:
        return relax_loss.CrossEntropyLoss(reduction="mean")(
            _tensor_type(output), _target_var(self.target_spec(output)))


@dataclass
class MSE:
    """Mean squared error against a target of the output's shape."""

    name: str = "mse"

    def target_spec(self, output: TensorSpec) -> TensorSpec:
        return TensorSpec("target", output.shape, output.dtype)

    def relax_function(self, output: TensorSpec) -> relax.Function:
        return relax_loss.MSELoss(reduction="mean")(
            _tensor_type(output), _target_var(self.target_spec(output)))


@dataclass
class TorchLoss:
    """A ``torch.nn.Module`` whose ``forward(prediction, target)`` returns the scalar loss."""

    module: object
    example_target: object
    name: str = "torch"
    _imported: object = field(default=None, repr=False)

    def target_spec(self, output: TensorSpec) -> TensorSpec:
        t = self.example_target
        return TensorSpec("target", tuple(t.shape), str(t.dtype).replace("torch.", ""))

    def relax_function(self, output: TensorSpec) -> relax.Function:
        import torch

        from .frontend.torch_frontend import from_torch

        class _Wrap(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, prediction, target):
                return self.inner(prediction, target)

        example = torch.zeros(output.shape, dtype=getattr(torch, output.dtype))
        imported = from_torch(_Wrap(self.module), (example, self.example_target))
        if imported.params:
            raise ValueError("TorchLoss: a loss module with parameters is not supported; "
                             "register them as constants or fold them into the model")
        if len(imported.output.shape) != 0:
            raise ValueError(f"TorchLoss: the loss must be a scalar, it has shape {imported.output.shape}")
        return imported.mod["forward"].without_attr("num_input")


def make_loss(spec) -> CrossEntropy | MSE | TorchLoss:
    """``"cross_entropy"``/``"ce"``, ``"mse"``, or a loss object."""
    if isinstance(spec, (CrossEntropy, MSE, TorchLoss)):
        return spec
    if spec in ("cross_entropy", "ce", None):
        return CrossEntropy()
    if spec == "mse":
        return MSE()
    raise ValueError(f"unknown loss {spec!r}; use 'cross_entropy', 'mse' or pock_tvm.TorchLoss(module, target)")
