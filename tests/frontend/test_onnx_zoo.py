"""ONNX models as users have them: classic CNN architectures exported by both torch exporters, and a
graph in the style of old model-zoo files, compile and train like PyTorch autograd (full, bias-only
and last-k schemes)."""

import onnx
import pytest
import torch

import pock_tvm
from helpers import SGD, assert_matches_torch, labels
from pock_tvm.frontend import from_onnx
from zoo import ZOO, build, export, zoo_style

SCHEMES = ["full", "bias-only", "last-1"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name, exporter):
        if (name, exporter) not in cache:
            model = build(name)
            path = tmp_path_factory.mktemp("zoo") / f"{name}-{exporter}.onnx"
            export(model, path, exporter)
            cache[name, exporter] = model, path
        return cache[name, exporter]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_exported_architecture_trains_like_torch(exported, name, exporter, scheme):
    model, path = exported(name, exporter)
    program = pock_tvm.compile(str(path), scheme=scheme, optimizer=SGD)
    assert_matches_torch(model, program, SGD, (torch.randn(2, 3, 32, 32),), labels(2))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_model_zoo_style_graph_trains_like_torch(scheme):
    proto, reference = zoo_style()
    program = pock_tvm.compile(proto, scheme=scheme, optimizer=SGD)
    assert_matches_torch(reference, program, SGD, (torch.randn(2, 3, 32, 32),), labels(2))


def test_shape_arithmetic_folds_and_integers_are_never_parameters():
    proto, _ = zoo_style()
    imported = from_onnx(proto)
    assert sorted(p.name for p in imported.params) == sorted(
        f"{layer}.{leaf}" for layer in ("conv1", "conv2", "fc1", "fc2") for leaf in ("weight", "bias"))
    ops = {b.value.op.name for block in imported.mod["forward"].body.blocks for b in block.bindings
           if hasattr(b.value, "op") and hasattr(b.value.op, "name")}
    assert "relax.shape_of" not in ops and "relax.nn.dropout" not in ops
    assert "relax.nn.avg_pool3d" not in ops and "relax.nn.conv2d" in ops  # LRN: a fixed 1x1 conv


def test_an_op_without_gradient_rule_names_the_onnx_node():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), "float32"), "conv.weight")
    nodes = [helper.make_node("Conv", ["x", "conv.weight"], ["c"], "conv", kernel_shape=[3, 3]),
             helper.make_node("Atan", ["c"], ["s"], "smooth"),
             helper.make_node("GlobalAveragePool", ["s"], ["p"], "pool"),
             helper.make_node("Flatten", ["p"], ["y"], "flat")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    with pytest.raises(ValueError, match=r"(?s)no gradient rule .*relax.atan -> \w+, from ONNX node 'smooth' "
                                         r"\(Atan\)"):
        pock_tvm.compile(proto, scheme="full")


def test_bad_files_and_shapes_are_clear_errors(tmp_path):
    (tmp_path / "cut.onnx").write_bytes(b"\x08\x07\x12\x04torc")
    with pytest.raises(ValueError, match=r"'.*cut.onnx' is not a valid ONNX model .*export it again"):
        pock_tvm.compile(str(tmp_path / "cut.onnx"))
    (tmp_path / "text.onnx").write_text("hello")
    with pytest.raises(ValueError, match=r"'.*text.onnx' is not a valid ONNX model"):
        pock_tvm.compile(str(tmp_path / "text.onnx"))
    proto, _ = zoo_style()
    onnx.save(proto, str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match=r"input_shapes names \['image'\], which the model does not have; "
                                         r"its inputs are \['data'\]"):
        pock_tvm.compile(str(tmp_path / "m.onnx"), input_shapes={"image": (2, 3, 32, 32)})


def test_schemes_select_by_kind_not_by_name_on_zoo_names():
    # Caffe2-converted zoo files name biases conv1_b_0: bias-only, last-N and the report find
    # them from the graph (an add of a 1-D tensor after the conv), not from the word "bias"
    from pock_tvm.scheme import Scheme
    from zoo import caffe2_names

    proto, reference = zoo_style()
    imported = from_onnx(caffe2_names(proto))
    updates = Scheme.preset("bias-only").resolve(imported)
    assert sorted(n for n, u in updates.items() if u.mode == "full") == sorted(
        f"{layer}_b_0" for layer in ("conv1", "conv2", "fc1", "fc2"))
    last = Scheme.preset("last-1").resolve(imported)
    assert sorted(n for n, u in last.items() if u.mode == "full") == ["fc2_b_0", "fc2_w_0"]
    program = pock_tvm.compile(imported, scheme="bias-only", optimizer=SGD)
    assert [r.layer for r in program.report().layers] == ["conv1", "conv2", "fc1", "fc2"]


def test_batchnorm_shift_is_a_bias_and_its_scale_a_norm_weight_whatever_their_names():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from pock_tvm.scheme import Scheme

    rng = np.random.default_rng(0)
    inits = {"c_w": rng.standard_normal((4, 3, 3, 3)), "bn_s": rng.uniform(0.5, 1.5, 4), "bn_o": rng.standard_normal(4),
             "bn_m": rng.standard_normal(4) * 0.1, "bn_v": rng.uniform(0.5, 1.5, 4), "fc_W": rng.standard_normal((10, 4)),
             "fc_B": rng.standard_normal(10)}
    nodes = [helper.make_node("Conv", ["x", "c_w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn_s", "bn_o", "bn_m", "bn_v"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "fc_W", "fc_B"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])],
                              [numpy_helper.from_array(v.astype("float32"), k) for k, v in inits.items()])
    imported = from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)]))
    bias = Scheme.preset("bias-only").resolve(imported)
    assert sorted(n for n, u in bias.items() if u.mode == "full") == ["bn_o", "fc_B"]
    norm = Scheme.preset("bias-norm").resolve(imported)
    assert sorted(n for n, u in norm.items() if u.mode == "full") == ["bn_o", "bn_s", "fc_B"]
