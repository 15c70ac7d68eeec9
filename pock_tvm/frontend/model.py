"""What every frontend hands to the compiler: a Relax ``forward`` function plus named parameters."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import tvm

from ..runtime.spec import TensorSpec


@dataclass
class ParamInfo:
    """One parameter or buffer of the source model.

    ``name`` is the source name (``features.3.conv.0.weight`` or an ONNX initializer name),
    ``var_name`` the name of the matching Relax parameter of ``forward``. Buffers (BatchNorm
    running statistics) are never trainable. ``adapter``: added by the compiler (LoRA), not the model.
    """

    name: str
    var_name: str
    value: np.ndarray
    is_buffer: bool = False
    adapter: bool = False

    @property
    def layer(self) -> str:
        """The layer the tensor belongs to: ``features.3.conv.0`` of ``features.3.conv.0.weight``;
        for names without dots (ONNX model-zoo files: ``conv1_w_0``, ``vgg0_conv0_bias``,
        ``resnetv17_batchnorm0_gamma``) the name without its leaf (see :data:`LEAVES`)."""
        if "." in self.name:
            return self.name.rpartition(".")[0]
        parts = self.name.split("_")
        if len(parts) > 2 and parts[-1].isdigit():
            parts = parts[:-1]  # Caffe2's blob version: conv1_w_0
        if len(parts) > 1 and parts[-1] in LEAVES:
            return "_".join(parts[:-1])
        if len(parts) > 2 and "_".join(parts[-2:]) in LEAVES:
            return "_".join(parts[:-2])
        return self.name


# the last word of a parameter's name in ONNX files without dotted names (Caffe2, MXNet, CNTK exports)
LEAVES = {"w", "b", "W", "B", "weight", "bias", "weights", "biases", "gamma", "beta", "scale", "s", "kernel",
          "running_mean", "running_var", "moving_mean", "moving_var", "mean", "var", "rm", "riv"}


@dataclass
class ImportedModel:
    """A model in Relax form.

    ``mod["forward"]`` takes the user inputs followed by every entry of ``params`` in order and
    returns the model output. ``origins`` maps Relax variable names of ``forward`` to a readable
    description of the source node that produced them (used in error messages). ``padding_rows``:
    the padding row of each embedding table that has one (``nn.Embedding(padding_idx=...)``, as
    BERT's); autodiff gives it no gradient, as torch does.
    """

    mod: tvm.IRModule
    inputs: list[TensorSpec]
    params: list[ParamInfo]
    output: TensorSpec
    origins: dict[str, str] = field(default_factory=dict)
    source: str = "torch"
    # {parameter name: row}: an embedding's padding row (torch ``padding_idx``), which gets no gradient
    padding_rows: dict[str, int] = field(default_factory=dict)

    def param(self, name: str) -> ParamInfo:
        for info in self.params:
            if info.name == name:
                return info
        raise KeyError(name)


def with_index_bounds(imported: ImportedModel) -> ImportedModel:
    """``imported`` with ``bound`` set on every integer input that indexes a table (token ids into
    an embedding), from :func:`pock_tvm.analysis.layers.index_bounds`."""
    from ..analysis.layers import index_bounds

    bounds = index_bounds(imported.mod["forward"], [s.name for s in imported.inputs])
    return replace(imported, inputs=[replace(s, bound=bounds.get(s.name, s.bound)) for s in imported.inputs])


def origins_by_binding(func, produced: dict[str, str]) -> dict[str, str]:
    """Readable source of every binding of ``func``: ``produced`` names the source node of some
    binding variables (a node's result); the bindings emitted before it, since the previous
    node's result, belong to the same node."""
    origins: dict[str, str] = {}
    pending: list[str] = []
    for block in func.body.blocks:
        for binding in block.bindings:
            pending.append(binding.var.name)
            if binding.var.name in produced:
                for var in pending:
                    origins[var] = produced[binding.var.name]
                pending = []
    return origins
