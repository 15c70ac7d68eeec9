"""Losses appended to the model at compile time.

Each loss knows the spec of its target tensor and builds a Relax function
``loss(prediction, target) -> scalar`` with one dataflow block, which ``AppendLoss`` inlines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .calling import IGNORE_INDEX
from .runtime.spec import TensorSpec

# TVM is imported where a loss function is built, not here: the CLI reads LOSSES without it.


def _tensor_type(spec: TensorSpec):
    from tvm import relax

    return relax.TensorType(spec.shape, spec.dtype)


def _target_var(spec: TensorSpec):
    """The loss function's target parameter, under the spec's name (what the compiled step calls it)."""
    from tvm import relax

    return relax.Var(spec.name, _tensor_type(spec))


@dataclass
class CrossEntropy:
    """Softmax cross-entropy on integer class labels (``F.cross_entropy``, mean reduction)."""

    name: str = "cross_entropy"

    def target_spec(self, output: TensorSpec) -> TensorSpec:
        if len(output.shape) != 2:
            raise ValueError(f"CrossEntropy: needs (batch, classes) logits, the model returns {output.shape}")
        return TensorSpec("target", (output.shape[0],), "int64")

    def relax_function(self, output: TensorSpec):
        from tvm.relax.training import loss as relax_loss

        return relax_loss.CrossEntropyLoss(reduction="mean")(
            _tensor_type(output), _target_var(self.target_spec(output)))


@dataclass
class NextTokenCrossEntropy:
    """A causal LM's loss (Hugging Face ``labels=input_ids``): the logits at position ``t`` predict
    the label at ``t + 1``; labels equal to ``ignore_index`` (padding, a prompt) do not count, and
    the mean is over the labels that do. Takes ``(batch, sequence, vocab)`` logits and
    ``(batch, sequence)`` integer labels."""

    ignore_index = IGNORE_INDEX
    name: str = "next_token"

    def target_spec(self, output: TensorSpec) -> TensorSpec:
        if len(output.shape) != 3 or output.shape[1] < 2:
            raise ValueError("NextTokenCrossEntropy: needs (batch, sequence >= 2, vocab) logits, the model "
                             f"returns {output.shape}; use loss='cross_entropy' for a classifier")
        return TensorSpec("target", output.shape[:2], "int64")

    def relax_function(self, output: TensorSpec):
        from tvm import relax

        R = relax.op
        batch, seq, vocab = output.shape
        logits = relax.Var("prediction", _tensor_type(output))
        labels = _target_var(self.target_spec(output))
        bb = relax.BlockBuilder()
        with bb.function("loss", [logits, labels]):
            with bb.dataflow():
                # the labels move one position left (the last one counts nowhere), not the logits:
                # no (batch, sequence - 1, vocab) copy of them and of their gradient
                tail = bb.emit(R.strided_slice(labels, [1], [1], [seq]))
                ignored = relax.const(np.full((batch, 1), self.ignore_index, "int64"), "int64")
                shifted = bb.emit(R.reshape(R.concat([tail, ignored], axis=1), (batch * seq,)))
                log_p = bb.emit(R.nn.log_softmax(R.reshape(logits, (batch * seq, vocab))))
                # the mean over the positions that count, and 0 (no gradient) when none does (an
                # all-padding batch): "mean" would divide by zero and turn every parameter into NaN
                total = bb.emit(R.nn.nll_loss(log_p, shifted, None, "sum", self.ignore_index))
                counted = bb.emit(R.sum(R.astype(R.not_equal(shifted, relax.const(self.ignore_index, "int64")),
                                                 "float32")))
                loss = bb.emit_output(R.divide(total, R.maximum(counted, relax.const(1.0, "float32"))))
            bb.emit_func_output(loss)
        return bb.get()["loss"]


@dataclass
class MSE:
    """Mean squared error against a target of the output's shape."""

    name: str = "mse"

    def target_spec(self, output: TensorSpec) -> TensorSpec:
        return TensorSpec("target", output.shape, output.dtype)

    def relax_function(self, output: TensorSpec):
        from tvm.relax.training import loss as relax_loss

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

    def relax_function(self, output: TensorSpec):
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


class Loss(Protocol):
    """What the compiler asks of a loss: ``name`` (recorded in the bundle), ``target_spec(output)``
    (the target tensor the step takes) and ``relax_function(output)`` (``loss(prediction, target)
    -> scalar`` in one dataflow block, which ``AppendLoss`` inlines). A new built-in loss is a
    dataclass with these, added to :data:`LOSSES`; the CLI and ``make_loss`` take it from there."""

    name: str

    def target_spec(self, output: TensorSpec) -> TensorSpec: ...

    def relax_function(self, output: TensorSpec): ...


# name -> loss class, the one list of built-in losses ("ce" is short for "cross_entropy")
LOSSES = {"cross_entropy": CrossEntropy, "ce": CrossEntropy, "next_token": NextTokenCrossEntropy,
          "mse": MSE}


def make_loss(spec) -> Loss:
    """A name of :data:`LOSSES` (``None`` is ``"cross_entropy"``) or a loss object."""
    if spec is not None and not isinstance(spec, str):
        if not all(hasattr(spec, a) for a in ("name", "target_spec", "relax_function")):
            raise ValueError(f"loss {spec!r} is not a loss: it needs name, target_spec() and relax_function() "
                             "(pock_tvm.loss.Loss), e.g. pock_tvm.TorchLoss(module, target)")
        return spec
    if spec is None:
        return CrossEntropy()
    if spec in LOSSES:
        return LOSSES[spec]()
    raise ValueError(f"unknown loss {spec!r}; use one of {', '.join(LOSSES)} or "
                     "pock_tvm.TorchLoss(module, target)")
