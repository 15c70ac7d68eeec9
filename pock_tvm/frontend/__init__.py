"""Frontends: PyTorch (``torch.export``) and ONNX into one :class:`ImportedModel`."""

from __future__ import annotations

from pathlib import Path

from .model import ImportedModel, ParamInfo, TensorSpec


def from_torch(model, example_inputs) -> ImportedModel:
    """See :func:`pock_tvm.frontend.torch_frontend.from_torch` (imports torch on first use)."""
    from .torch_frontend import from_torch as convert

    return convert(model, example_inputs)


def from_onnx(model, input_shapes: dict | None = None) -> ImportedModel:
    """See :func:`pock_tvm.frontend.onnx_frontend.from_onnx` (imports onnx on first use)."""
    from .onnx_frontend import from_onnx as convert

    return convert(model, input_shapes)

__all__ = ["ImportedModel", "ParamInfo", "TensorSpec", "from_onnx", "from_torch", "import_model"]


def _nonempty(imported: ImportedModel) -> ImportedModel:
    """A step over an empty batch (a dimension of 0) computes nothing and returns garbage: refused."""
    for spec in imported.inputs:
        if any(int(d) < 1 for d in spec.shape):
            raise ValueError(f"import_model: input '{spec.name}' has shape {tuple(spec.shape)}; every dimension "
                             "must be >= 1 (a batch of at least one sample)")
    return imported


def import_model(model, example_inputs=None, input_shapes: dict | None = None) -> ImportedModel:
    """Dispatch on the model's kind: ``nn.Module`` needs ``example_inputs``; ONNX path or proto."""
    if isinstance(model, ImportedModel):
        return model
    if isinstance(model, (str, Path)) or type(model).__name__ == "ModelProto":
        return _nonempty(from_onnx(model, input_shapes))
    import torch

    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise ValueError("import_model: a torch model needs example_inputs (a tensor or tuple)")
        return _nonempty(from_torch(model, example_inputs))
    raise ValueError(
        f"import_model: unsupported model type {type(model).__name__}; pass a torch.nn.Module, "
        "an .onnx path or an onnx.ModelProto"
    )
