"""Import an ONNX model (file or ``onnx.ModelProto``) into Relax.

Float initializers become runtime parameters under their ONNX names; initializers that feed the
statistics inputs of ``BatchNormalization`` are marked as buffers (never trained). Integer
initializers (shapes, axes, indices) become constants, so shape arithmetic folds at import and
nothing integer is ever a trainable parameter. Before TVM's importer runs, the model is brought to
the form it reads (see :func:`normalize`); ops whose TVM conversion cannot be differentiated get
a differentiable one here (:data:`CONVERTERS`). Every Relax binding remembers the ONNX node it
came from, for error messages.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper
import tvm
from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

from .onnx_qoperator import to_qdq
from .model import ImportedModel, ParamInfo, TensorSpec, origins_by_binding, with_index_bounds

logger = logging.getLogger(__name__)

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64",
                onnx.TensorProto.INT32: "int32", onnx.TensorProto.FLOAT16: "float16"}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _lrn(bb, inputs, attr):
    """LocalResponseNormalization as ops with gradient rules: the sum of squares over a window of
    channels is a 1x1 convolution with a fixed banded weight (ONNX: floor((size-1)/2) channels
    before, ceil((size-1)/2) after)."""
    x = inputs[0]
    size = int(attr["size"])
    alpha, beta, bias = float(attr.get("alpha", 1e-4)), float(attr.get("beta", 0.75)), float(attr.get("bias", 1.0))
    if len(x.ty.shape) != 4:
        raise ValueError(f"from_onnx: LRN node '{attr['tvm_custom']['name']}' needs a 4-D input (N, C, H, W)")
    channels = int(x.ty.shape[1])
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    dtype = str(x.ty.dtype)
    band = np.zeros((channels, channels, 1, 1), dtype)
    for c in range(channels):
        band[c, max(0, c - before):min(channels, c + after + 1)] = 1.0
    R = relax.op
    window = R.nn.conv2d(R.multiply(x, x), relax.const(band))
    scale = R.add(relax.const(bias, dtype), R.multiply(relax.const(alpha / size, dtype), window))
    return R.divide(x, R.power(scale, relax.const(beta, dtype)))


def _pad(bb, inputs, attr):
    """Constant-mode Pad as ``relax.nn.pad`` (which has a gradient rule); TVM's importer writes a
    TIR kernel call that autodiff cannot see through. Other modes keep TVM's conversion."""
    x = inputs[0]
    mode = attr.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = attr.get("pads")
    if pads is None and len(inputs) > 1 and isinstance(inputs[1], tvm.ir.GenericConst):
        pads = inputs[1].value.numpy().tolist()
    value = 0.0
    if len(inputs) > 2 and inputs[2] is not None:
        if not isinstance(inputs[2], tvm.ir.GenericConst):
            return None
        value = float(inputs[2].value.numpy())
    if mode != "constant" or pads is None or (len(inputs) > 3 and inputs[3] is not None):
        return None
    rank = len(x.ty.shape)
    widths = [int(w) for pair in zip(pads[:rank], pads[rank:]) for w in pair]
    return relax.op.nn.pad(x, widths, "constant", value)


def _clip(bb, inputs, attr):
    """Clip with constant bounds (ReLU6 at opset >= 11 passes them as inputs) as ``relax.clip``,
    which has a gradient rule; TVM's writes a TIR kernel call autodiff cannot see through. Bounds
    computed at run time keep TVM's conversion."""
    x = inputs[0]
    bounds = [attr.get("min"), attr.get("max")]
    for k, value in enumerate(inputs[1:3]):
        if value is None:
            continue
        if not isinstance(value, tvm.ir.GenericConst):
            return None
        bounds[k] = float(value.value.numpy())
    low = -3.4e38 if bounds[0] is None else float(bounds[0])
    high = 3.4e38 if bounds[1] is None else float(bounds[1])
    return relax.op.clip(x, low, high)


def _dropout(bb, inputs, attr):
    """Dropout is the identity, as in the torch frontend (eval mode: fine-tuning keeps the
    inference graph); only its data output may be used."""
    return inputs[0] if attr["tvm_custom"]["num_outputs"] == 1 else None


# ONNX op -> converter ``(bb, inputs, attrs) -> relax.Expr``, used instead of TVM's (``None``: use TVM's).
CONVERTERS = {
    "LRN": _lrn,  # TVM's goes through avg_pool3d, which has no gradient rule
    "Pad": _pad,  # TVM's is a TIR kernel call, opaque to autodiff
    "Dropout": _dropout,  # TVM's keeps relax.nn.dropout (no gradient rule) in older opsets
    "Clip": _clip,  # TVM's is a TIR kernel call at opset >= 11 (bounds as inputs), opaque to autodiff
}


class _TrackingImporter(ONNXGraphImporter):
    """TVM's ONNX importer with :data:`CONVERTERS`, recording which node produced each binding."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.produced: dict[str, str] = {}

    def _convert_operator(self, op_name, inputs, attrs, opset):
        node = attrs["tvm_custom"]["name"]
        out = CONVERTERS[op_name](self.bb, inputs, attrs) if op_name in CONVERTERS else None
        if out is None:
            out = super()._convert_operator(op_name, inputs, attrs, opset)
        else:
            out = self.bb.normalize(out)
        if isinstance(out, relax.Call):
            out = self.bb.emit(out)  # a binding of its own, so the node can be named in errors
        if isinstance(out, relax.Var):  # an identity (Dropout) keeps its producer's name
            self.produced.setdefault(out.name, f"ONNX node '{node}' ({op_name})")
        return out


def load(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """The model proto of ``model``; a missing, truncated or non-ONNX file is a clear error."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise ValueError(f"from_onnx: no such file '{path}'")
    try:
        proto = onnx.load(str(path))
    except Exception as err:  # noqa: BLE001 -- protobuf, onnx's checker (external data outside the directory)
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ("its external data must be files beside the model, inside its directory"
                if "external" in message.lower() or "data" in message.lower() else
                "export it again (torch.onnx.export) or check that the download finished")
        raise ValueError(f"from_onnx: '{path}' is not a valid ONNX model ({type(err).__name__}: {message}); "
                         f"{hint}") from None
    if not proto.graph.node:
        raise ValueError(f"from_onnx: '{path}' is not a valid ONNX model (it holds no graph nodes: truncated, or "
                         "another kind of file); export it again (torch.onnx.export) or check that the download "
                         "finished")
    check_sorted(proto.graph)
    return proto


def check_sorted(graph) -> None:
    """ONNX requires a graph's nodes in topological order; a node that reads a value no earlier node,
    input or initializer makes (a cycle, or a graph edited by hand) is a clear error."""
    known = {v.name for v in graph.input} | {i.name for i in graph.initializer} | {""}
    for node in graph.node:
        for name in node.input:
            if name not in known:
                label = node.name or node.output[0] if node.output else node.op_type
                raise ValueError(f"from_onnx: ONNX node '{label}' ({node.op_type}) reads '{name}' before any node "
                                 "produces it: the graph has a cycle or is not sorted topologically; fix the export "
                                 "(onnx.checker.check_model names the problem)")
        known.update(node.output)


def first_input(model) -> str:
    """Name of the model's first real input (not an initializer listed as an input)."""
    proto = load(model)
    inits = {i.name for i in proto.graph.initializer}
    return next(v.name for v in proto.graph.input if v.name not in inits)


def _input_specs(graph, initializer_names: set[str], shapes: dict | None) -> list[TensorSpec]:
    names = [v.name for v in graph.input if v.name not in initializer_names]
    unknown = sorted(set(shapes or {}) - set(names))
    if unknown:
        raise ValueError(f"from_onnx: input_shapes names {unknown}, which the model does not have; its inputs "
                         f"are {names}")
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


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in the form TVM's importer reads and training needs:

    - ``Constant`` nodes keep their value in ``value`` (the dynamo exporter writes ``value_ints`` etc.);
    - integer initializers (shapes, axes, indices) become ``Constant`` nodes: folded at import, never
      parameters (a trainable int64 tensor would stop autodiff);
    - in a QDQ model (``onnxruntime.quantization``), the integer tensors a ``DequantizeLinear``
      reads (int8 weights, int32 biases) are parameters like float ones, so that a scheme can
      train them; the scales and zero points of ``QuantizeLinear``/``DequantizeLinear`` are
      constants (the integer kernels and the optimizer's QAS read them at compile time);
    - initializers that the file also lists as graph inputs (IR version 3) are only initializers;
    - each ``Identity(initializer)`` output gets its own initializer. torch's exporter deduplicates
      equal tensors: a fresh BatchNorm's running_var (ones) and weight (ones) become one initializer
      plus an ``Identity``; training the weight would then move the statistics too.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    quantized = {n.input[0] for n in qdq if n.op_type == "DequantizeLinear"}
    qdq_constants = {name for n in qdq for name in n.input[1:]}
    front, keep = [], []
    for init in graph.initializer:
        if init.name in qdq_constants or (init.data_type not in _FLOAT_TYPES and init.name not in quantized):
            front.append(helper.make_node("Constant", [], [init.name], value=init))
        else:
            keep.append(init)
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant":
            nodes.append(_constant_with_value(node))
        elif node.op_type == "Identity" and node.input[0] in inits and inits[node.input[0]].data_type in _FLOAT_TYPES:
            array = numpy_helper.to_array(inits[node.input[0]])
            keep.append(numpy_helper.from_array(array.copy(), node.output[0]))
        else:
            nodes.append(node)
    const_names = {n.output[0] for n in front}
    # files of IR version 3 (opsets up to 8: the older zoo models) also list every initializer as a
    # graph input; those are parameters, not inputs (imported as both, each weight came twice)
    inputs = [v for v in graph.input if v.name not in const_names and v.name not in {k.name for k in keep}]
    del graph.initializer[:], graph.node[:], graph.input[:]
    graph.initializer.extend(keep)
    graph.node.extend(front + nodes)
    graph.input.extend(inputs)
    return model


def _constant_with_value(node):
    attrs = {a.name: a for a in node.attribute}
    if "value" in attrs or "sparse_value" in attrs:
        return node
    name = node.output[0]
    if "value_int" in attrs:
        value = numpy_helper.from_array(np.asarray(attrs["value_int"].i, np.int64), name)
    elif "value_ints" in attrs:
        value = numpy_helper.from_array(np.asarray(list(attrs["value_ints"].ints), np.int64), name)
    elif "value_float" in attrs:
        value = numpy_helper.from_array(np.asarray(attrs["value_float"].f, np.float32), name)
    elif "value_floats" in attrs:
        value = numpy_helper.from_array(np.asarray(list(attrs["value_floats"].floats), np.float32), name)
    else:
        raise ValueError(f"from_onnx: Constant node '{node.name or name}' has no value the importer can read "
                         f"(attributes {sorted(attrs)})")
    return helper.make_node("Constant", [], [name], name=node.name, value=value)


# ops never folded: they read data, not shapes, or hold subgraphs
_NO_FOLD = {"Constant", "If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike",
            "RandomUniformLike", "Multinomial", "Dropout"}


def fold_shapes(model: onnx.ModelProto, inputs: list[TensorSpec], rounds: int = 4) -> onnx.ModelProto:
    """Evaluate at import what depends only on constants and static shapes: ``Shape`` of a tensor
    whose shape is known, every node whose inputs are all such constants (the
    Shape/Gather/Unsqueeze/Concat/Reshape arithmetic of exported ``view(x.size(0), -1)``), and
    ``If`` on a known condition (replaced by the branch taken). Float initializers are parameters
    and never folded. Changes ``model`` in place and returns it."""
    graph = model.graph
    for value in graph.input:
        spec = next((s for s in inputs if s.name == value.name), None)
        if spec is not None:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in spec.shape:
                dims.add().dim_value = int(d)
    for _ in range(rounds):  # an inlined branch can make more shapes known
        if not _fold_once(model):
            break
    return model


def _fold_once(model: onnx.ModelProto) -> bool:
    graph = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception as err:  # noqa: BLE001 -- inference is a help here, never required
        logger.info("ONNX shape inference failed (%s); shapes are not folded", err)
        return False
    shapes = {}
    for value in [*inferred.value_info, *inferred.input, *inferred.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            shapes[value.name] = [d.dim_value for d in tensor_type.shape.dim]
    known: dict[str, np.ndarray] = {}
    pending, nodes, folded = list(graph.node), [], 0
    while pending:
        node = pending.pop(0)
        values = None
        if node.op_type == "Constant":
            value = next(a for a in _constant_with_value(node).attribute if a.name == "value")
            known[node.output[0]] = numpy_helper.to_array(value.t)
        elif node.op_type == "If" and node.input[0] in known:
            branch = next(a.g for a in node.attribute if a.name == ("then_branch" if known[node.input[0]].all()
                                                                       else "else_branch"))
            renames = [helper.make_node("Identity", [o.name], [out]) for o, out in zip(branch.output, node.output)]
            pending[:0] = [*branch.node, *renames]
            folded += 1
            continue
        elif node.op_type == "Shape" and node.input[0] in shapes:
            attrs = {a.name: a.i for a in node.attribute}
            shape = shapes[node.input[0]]
            values = [np.asarray(shape[attrs.get("start", 0):attrs.get("end", len(shape))], np.int64)]
        elif node.op_type not in _NO_FOLD and node.input and all(i in known or not i for i in node.input):
            try:
                values = _evaluate(node, {i: known[i] for i in node.input if i}, model.opset_import)
            except Exception as err:  # noqa: BLE001 -- left to TVM's importer
                logger.info("ONNX node %s (%s) not folded: %s", node.name, node.op_type, err)
        if values is None:
            nodes.append(node)
            continue
        folded += 1
        for name, value in zip(node.output, values):
            known[name] = np.asarray(value)
            nodes.append(helper.make_node("Constant", [], [name], name=f"{node.name or name}_folded",
                                          value=numpy_helper.from_array(np.asarray(value), name)))
    del graph.node[:]
    graph.node.extend(nodes)
    logger.info("folded %d shape nodes of the ONNX graph", folded)
    return folded > 0


def _evaluate(node, feeds: dict[str, np.ndarray], opset_import) -> list[np.ndarray]:
    """Run one node with ONNX's reference implementation, at the model's opset."""
    from onnx.reference import ReferenceEvaluator

    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
              for name, value in feeds.items()]
    outputs = [helper.make_empty_tensor_value_info(name) for name in node.output]
    model = helper.make_model(helper.make_graph([node], "fold", inputs, outputs), opset_imports=opset_import)
    return ReferenceEvaluator(model).run(None, feeds)


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def _relax_names(initializers: dict) -> dict:
    """Initializers by the name their Relax variable gets when TVM's importer shortens it: torch's
    exporter names folded constants ``onnx::Conv_16`` (a conv with its BatchNorm folded in), the
    variable is ``Conv_16``. Shortened names that two initializers share are left out."""
    found: dict = {}
    for name, init in initializers.items():
        short = name.rsplit("::", 1)[-1]
        if short != name:
            found[short] = None if short in found else init
    return {k: v for k, v in found.items() if v is not None and k not in initializers}


def from_onnx(model: str | Path | onnx.ModelProto, input_shapes: dict | None = None) -> ImportedModel:
    """Import ``model``; ``input_shapes`` overrides dynamic input dimensions."""
    model = normalize(to_qdq(load(model)))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    inputs = _input_specs(graph, set(initializers), input_shapes)
    fold_shapes(model, inputs)
    buffers = {name for node in graph.node if node.op_type == "BatchNormalization"
               for name in node.input[3:5]}
    importer = _TrackingImporter({s.name: list(s.shape) for s in inputs}, {s.name: s.dtype for s in inputs},
                                 keep_params_in_input=True, sanitize=False)
    try:
        mod = importer.from_onnx(graph, _opset(model))
    except NotImplementedError as err:
        raise ValueError(f"from_onnx: {err}; pock_tvm imports the ONNX ops TVM's importer knows") from None
    func = mod["main"]
    params = []
    by_relax_name = _relax_names(initializers)
    for var in func.params[len(inputs):]:
        init = initializers.get(var.name) or by_relax_name.get(var.name)
        if init is None:
            raise ValueError(f"from_onnx: Relax input '{var.name}' is not an ONNX initializer")
        value = np.require(numpy_helper.to_array(init), requirements="C")
        params.append(ParamInfo(init.name, var.name, value, init.name in buffers))
    ret = func.ret_ty
    output = TensorSpec("output", tuple(int(d) for d in ret.shape), str(ret.dtype))
    out_mod = type(mod)({})
    out_mod["forward"] = func.without_attr("params").with_attr("global_symbol", "forward")
    logger.info("imported ONNX model: %d inputs, %d initializers", len(inputs), len(params))
    return with_index_bounds(ImportedModel(out_mod, inputs, params, output, origins_by_binding(func, importer.produced),
                                           "onnx"))
