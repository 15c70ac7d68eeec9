"""Import an ONNX model (file or ``onnx.ModelProto``) into Relax.

Initializers become runtime parameters under their ONNX names. Initializers that feed the
statistics inputs of ``BatchNormalization`` are marked as buffers (never trained).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from tvm.relax.frontend.onnx import from_onnx as _tvm_from_onnx

from .model import ImportedModel, ParamInfo, TensorSpec

logger = logging.getLogger(__name__)

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64",
                onnx.TensorProto.INT32: "int32", onnx.TensorProto.FLOAT16: "float16"}


def _input_specs(graph, initializer_names: set[str], shapes: dict | None) -> list[TensorSpec]:
    specs = []
    for value in graph.input:
        if value.name in initializer_names:
            continue
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if shapes and value.name in shapes:
            dims = list(shapes[value.name])
        if any(d is None or d <= 0 for d in dims):
            raise ValueError(
                f"from_onnx: input '{value.name}' has a dynamic shape {dims}; pass "
                f"input_shapes={{'{value.name}': (batch, ...)}} to fix the training shape"
            )
        dtype = _ONNX_DTYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise ValueError(f"from_onnx: input '{value.name}' has unsupported element type {tensor_type.elem_type}")
        specs.append(TensorSpec(value.name, tuple(int(d) for d in dims), dtype))
    return specs


def _origins(graph) -> dict[str, str]:
    """ONNX node names by op type, used to point at candidate source nodes in errors."""
    by_type: dict[str, list[str]] = {}
    for node in graph.node:
        by_type.setdefault(node.op_type, []).append(node.name or node.output[0])
    return {f"onnx:{op}": ", ".join(names[:6]) for op, names in by_type.items()}


def _materialize_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give each ``Identity(initializer)`` output its own initializer.

    torch's exporter deduplicates equal tensors: a fresh BatchNorm's running_var (ones) and
    weight (ones) become one initializer plus an ``Identity``. Training the weight would then
    move the running statistics too; a copy per name keeps them apart and keeps the names.
    """
    inits = {init.name: init for init in model.graph.initializer}
    if not any(n.op_type == "Identity" and n.input[0] in inits for n in model.graph.node):
        return model
    model = copy.deepcopy(model)
    inits = {init.name: init for init in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            array = numpy_helper.to_array(inits[node.input[0]])
            model.graph.initializer.append(numpy_helper.from_array(array.copy(), node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def from_onnx(model: str | Path | onnx.ModelProto, input_shapes: dict | None = None) -> ImportedModel:
    """Import ``model``; ``input_shapes`` overrides dynamic input dimensions."""
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.exists():
            raise ValueError(f"from_onnx: no such file '{path}'")
        model = onnx.load(str(path))
    model = _materialize_identities(model)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    inputs = _input_specs(graph, set(initializers), input_shapes)
    buffers = {name for node in graph.node if node.op_type == "BatchNormalization"
               for name in node.input[3:5]}
    mod = _tvm_from_onnx(
        model,
        shape_dict={s.name: list(s.shape) for s in inputs},
        dtype_dict={s.name: s.dtype for s in inputs},
        keep_params_in_input=True,
        sanitize_input_names=False,
    )
    func = mod["main"]
    params = []
    for var in func.params[len(inputs):]:
        init = initializers.get(var.name)
        if init is None:
            raise ValueError(f"from_onnx: Relax input '{var.name}' is not an ONNX initializer")
        value = np.ascontiguousarray(numpy_helper.to_array(init))
        params.append(ParamInfo(var.name, var.name, value, var.name in buffers))
    ret = func.ret_ty
    output = TensorSpec("output", tuple(int(d) for d in ret.shape), str(ret.dtype))
    out_mod = type(mod)({})
    out_mod["forward"] = func.without_attr("params").with_attr("global_symbol", "forward")
    logger.info("imported ONNX model: %d inputs, %d initializers", len(inputs), len(params))
    return ImportedModel(out_mod, inputs, params, output, _origins(graph), "onnx")
