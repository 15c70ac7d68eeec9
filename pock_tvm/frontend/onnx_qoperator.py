"""ONNX QOperator models (``QLinearConv``, ``QLinearMatMul``) in QDQ form, which TVM imports.

``onnxruntime.quantization`` writes a quantized model in one of two formats: QDQ
(``QuantizeLinear``/``DequantizeLinear`` around float ops) or QOperator (integer ops that take
their scales and zero points as inputs). TVM 0.27's importer reads only the first; each
QOperator node here becomes the QDQ nodes with the same arithmetic:

    QLinearConv(x, sx, zx, w, sw, zw, sy, zy, B) = Q(Conv(DQ(x, sx, zx), DQ(w, sw, zw), DQ(B, sx * sw)), sy, zy)
    QLinearMatMul(a, sa, za, b, sb, zb, sy, zy) = Q(MatMul(DQ(a, sa, za), DQ(b, sb, zb)), sy, zy)

A per-channel weight scale is on the weight's output axis (0 for a conv, 1 for ``b`` of a
matmul). The int32 bias's scale ``sx * sw`` is computed here, so it must be made of initializers.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

QOPERATORS = ("QLinearConv", "QLinearMatMul")


def to_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every ``QLinearConv``/``QLinearMatMul`` rewritten as QDQ nodes (a copy);
    ``model`` itself when it has none."""
    if not any(n.op_type in QOPERATORS for n in model.graph.node):
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type not in QOPERATORS:
            nodes.append(node)
            continue
        x, sx, zx, w, sw, zw, sy, zy, *bias = node.input
        prefix = node.name or node.output[0]
        conv = node.op_type == "QLinearConv"
        axis = 0 if conv else 1
        x_dq, w_dq, y = f"{prefix}_x_dq", f"{prefix}_w_dq", f"{prefix}_y"
        nodes.append(helper.make_node("DequantizeLinear", [x, sx, zx], [x_dq]))
        nodes.append(helper.make_node("DequantizeLinear", [w, sw, zw], [w_dq], axis=axis))
        inputs = [x_dq, w_dq]
        if bias and bias[0]:
            if sx not in inits or sw not in inits:
                raise ValueError(f"from_onnx: {node.op_type} '{prefix}' has a bias whose scale (input scale x weight "
                                 "scale) is not made of initializers; quantize the model with constant scales")
            scale = (numpy_helper.to_array(inits[sx]) * numpy_helper.to_array(inits[sw])).astype(np.float32)
            b_scale = f"{prefix}_b_scale"
            graph.initializer.append(numpy_helper.from_array(scale, b_scale))
            nodes.append(helper.make_node("DequantizeLinear", [bias[0], b_scale], [f"{prefix}_b_dq"], axis=0))
            inputs.append(f"{prefix}_b_dq")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        nodes.append(helper.make_node("Conv" if conv else "MatMul", inputs, [y], **attrs))
        nodes.append(helper.make_node("QuantizeLinear", [y, sy, zy], list(node.output)))
    del graph.node[:]
    graph.node.extend(nodes)
    return model
