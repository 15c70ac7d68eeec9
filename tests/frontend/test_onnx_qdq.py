"""ONNX QDQ models (onnxruntime.quantization's format): int8 weights import as parameters, the
forward equals ONNX's reference evaluator, frozen layers run as integer kernels, and trained int8
weights train (as float32 masters in integer units, with QAS)."""

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import pock_tvm
from pock_tvm.frontend import import_model
from pock_tvm.scheme import Rule, Scheme


def qdq_model(seed: int = 0) -> onnx.ModelProto:
    """conv-relu-conv-relu-pool-linear with onnxruntime's QDQ defaults: uint8 activations with a
    zero point per tensor, int8 weights per output channel."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(array, name))

    def activation(x, name, scale, zero_point):
        init(name + "_s", np.array(scale, np.float32))
        init(name + "_z", np.array(zero_point, np.uint8))
        nodes.append(helper.make_node("QuantizeLinear", [x, name + "_s", name + "_z"], [name + "_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [name + "_q", name + "_s", name + "_z"], [name + "_dq"]))
        return name + "_dq"

    def weight(name, shape):
        w = rng.standard_normal(shape).astype(np.float32) * 0.3
        s = (np.abs(w.reshape(shape[0], -1)).max(1) / 127).astype(np.float32)
        init(name, np.clip(np.round(w / s.reshape([-1] + [1] * (len(shape) - 1))), -127, 127).astype(np.int8))
        init(name + "_s", s)
        init(name + "_z", np.zeros(shape[0], np.int8))
        nodes.append(helper.make_node("DequantizeLinear", [name, name + "_s", name + "_z"], [name + "_dq"], axis=0))
        return name + "_dq"

    x = activation("x", "in", 0.03, 128)
    for i, cin in ((1, 3), (2, 8)):
        init(f"conv{i}.bias", (rng.standard_normal(8) * 0.1).astype(np.float32))
        nodes.append(helper.make_node("Conv", [x, weight(f"conv{i}.weight", (8, cin, 3, 3)), f"conv{i}.bias"],
                                      [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        x = activation(f"r{i}", f"a{i}", 0.02, 0)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["p"]))
    nodes.append(helper.make_node("Flatten", ["p"], ["f"]))
    init("fc.bias", np.zeros(10, np.float32))
    nodes.append(helper.make_node("Gemm", [activation("f", "a3", 0.01, 0), weight("fc.weight", (10, 8)), "fc.bias"],
                                  ["y"], transB=1))
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    return model


SCHEME = Scheme("qdq", rules=[Rule("conv2.weight", "full"), Rule("conv2.bias", "full"), Rule("fc.weight", "full")])


@pytest.fixture(scope="module")
def compiled():
    model = qdq_model()
    return model, pock_tvm.compile(model, scheme=SCHEME, optimizer=pock_tvm.SGD(lr=0.1, momentum=0.9))


def test_int8_weights_are_parameters_and_quantization_constants_are_not():
    imported = import_model(qdq_model())
    assert {p.name: str(p.value.dtype) for p in imported.params} == {
        "conv1.weight": "int8", "conv1.bias": "float32", "conv2.weight": "int8", "conv2.bias": "float32",
        "fc.weight": "int8", "fc.bias": "float32"}


def test_forward_equals_the_onnx_reference(compiled):
    """Up to ties: the pooled input of the last layer is a mean of 64 activations on a 0.02 grid, so
    it often lies exactly between two 0.01 steps, where a last-bit difference in the sum (numpy's
    pairwise order against a loop) picks the other step. One step moves an output by at most
    0.01 * max|W_fc|; a wrong scale, zero point or layout moves it by far more."""
    model, program = compiled
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    fc = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    step = 0.01 * float(np.abs(fc["fc.weight"] * fc["fc.weight_s"][:, None]).max())
    got = program.predict(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * step)
    assert np.mean(np.isclose(got, want, rtol=1e-5, atol=1e-6)) >= 0.5


def test_frozen_conv_is_an_integer_kernel_and_trained_weights_train(compiled):
    _, program = compiled
    int_convs = [gv.name_hint for gv, f in program.ir.functions.items() if isinstance(f, tvm.tirx.PrimFunc)
                 and "conv2d" in gv.name_hint and str(getattr(f.params[0], "dtype", "")) == "int32"]
    assert int_convs, "conv1 (frozen, uint8 activations with a zero point) should accumulate in int32"
    layout = {p.source: p for p in program.layout.params}
    assert layout["conv2.weight"].trainable and layout["conv2.weight"].dtype == "float32"
    assert program.report().quantization["tensors"]["conv1.weight"] == {
        **program.report().quantization["tensors"]["conv1.weight"], "dtype": "int8", "trained": False, "axis": 0}
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((2, 3, 8, 8)).astype(np.float32), np.array([1, 2])
    before = program.state_dict()["conv2.weight"]
    losses = [program.step(x, y) for _ in range(5)]
    assert losses[-1] < 0.8 * losses[0]
    moved = program.state_dict()["conv2.weight"] - before
    assert np.abs(moved).max() > 0.01  # integer units: QAS makes the update a float-sized step


def qoperator_model(seed: int = 0) -> onnx.ModelProto:
    """onnxruntime's QOperator format: QuantizeLinear, QLinearConv (int32 bias), QLinearMatMul,
    DequantizeLinear."""
    rng = np.random.default_rng(seed)
    inits = []

    def init(name, array):
        inits.append(numpy_helper.from_array(array, name))

    init("xs", np.array(0.03, np.float32))
    init("xz", np.array(128, np.uint8))
    init("w", rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8))
    init("ws", rng.uniform(0.002, 0.004, 8).astype(np.float32))
    init("wz", np.zeros(8, np.int8))
    init("b", rng.integers(-500, 500, 8).astype(np.int32))
    init("ys", np.array(0.05, np.float32))
    init("yz", np.array(0, np.uint8))
    init("m", rng.integers(-127, 128, (8, 5)).astype(np.int8))
    init("ms", np.array(0.01, np.float32))
    init("mz", np.array(0, np.int8))
    init("os", np.array(0.02, np.float32))
    init("oz", np.array(128, np.uint8))
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["cq"],
                              pads=[1, 1, 1, 1]),
             helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["c"]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("QuantizeLinear", ["f", "ys", "yz"], ["fq"]),
             helper.make_node("QLinearMatMul", ["fq", "ys", "yz", "m", "ms", "mz", "os", "oz"], ["oq"]),
             helper.make_node("DequantizeLinear", ["oq", "os", "oz"], ["y"])]
    graph = helper.make_graph(nodes, "qop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    return model


def test_a_qoperator_model_imports_as_qdq_with_the_same_numbers():
    model = qoperator_model()
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    imported = import_model(model)
    assert {p.name: str(p.value.dtype) for p in imported.params} == {"w": "int8", "b": "int32", "m": "int8"}
    program = pock_tvm.compile(model, scheme=Scheme("head", rules=[Rule("m", "full")]), optimizer=pock_tvm.SGD(lr=0.1))
    # the output is on a 0.02 grid: a tie in the pooled mean can move one output by one step
    np.testing.assert_allclose(program.predict(x), want, rtol=0, atol=0.02 + 1e-6)
    y = np.array([1, 3])
    losses = [program.step(x, y) for _ in range(4)]
    assert losses[-1] < losses[0]
