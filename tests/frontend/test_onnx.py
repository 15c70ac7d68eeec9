"""ONNX: a small CNN exported from torch, imported back, trained with each scheme."""

import numpy as np
import onnx
import pytest
import torch

import pock_tvm
from helpers import SGD, assert_matches_torch, labels
from pock_tvm.frontend import from_onnx
from pock_tvm.models import SmallCNN


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    path = tmp_path_factory.mktemp("onnx") / "small_cnn.onnx"
    # keep BatchNormalization nodes (no folding into conv) so the scheme sees them
    torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), str(path), dynamo=False,
                      do_constant_folding=False, input_names=["image"], output_names=["logits"])
    return model, path


def test_initializer_names_and_buffers_are_kept(exported):
    model, path = exported
    imported = from_onnx(path)
    names = {p.name for p in imported.params}
    assert set(dict(model.named_parameters())) <= names
    buffers = {p.name for p in imported.params if p.is_buffer}
    assert buffers == {f"features.{i}.1.running_{s}" for i in range(3) for s in ("mean", "var")}
    assert [s.name for s in imported.inputs] == ["image"]


@pytest.mark.parametrize("scheme", ["full", "partial",  # (the other schemes are tested on torch models; ONNX: -m slow)
                                    pytest.param("bias-only", marks=pytest.mark.slow),
                                    pytest.param("last-2", marks=pytest.mark.slow)])
def test_onnx_training_matches_torch(exported, scheme):
    model, path = exported
    if scheme == "partial":
        scheme = pock_tvm.Scheme(bias="all", rules=[pock_tvm.Rule("features.1.0.weight", "partial", 0.5),
                                                    pock_tvm.Rule("classifier", "full")])
    program = pock_tvm.compile(str(path), scheme=scheme, optimizer=SGD)
    assert_matches_torch(model, program, SGD, (torch.randn(2, 3, 16, 16),), labels(2))


def test_model_proto_and_dynamic_batch(exported, tmp_path):
    model, path = exported
    proto = onnx.load(str(path))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(ValueError, match=r"input 'image' has a dynamic shape.*input_shapes="):
        from_onnx(proto)
    imported = from_onnx(proto, input_shapes={"image": (4, 3, 16, 16)})
    assert imported.inputs[0].shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match="no such file"):
        from_onnx(tmp_path / "nope.onnx")


def test_a_file_listing_its_initializers_as_inputs_imports_each_weight_once():
    # IR version 3 (opset 7/8 zoo files): every initializer is also a graph input
    torch.manual_seed(0)
    model = SmallCNN().eval()
    import io

    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), buffer, dynamo=False, opset_version=7,
                      do_constant_folding=False, input_names=["image"], output_names=["logits"])
    proto = onnx.load_from_string(buffer.getvalue())
    assert {i.name for i in proto.graph.initializer} <= {i.name for i in proto.graph.input}
    imported = from_onnx(proto)
    names = [p.name for p in imported.params]
    assert len(names) == len(set(names)) and [s.name for s in imported.inputs] == ["image"]
    program = pock_tvm.compile(proto, scheme="full", optimizer=SGD)
    assert_matches_torch(model, program, SGD, (torch.randn(2, 3, 16, 16),), labels(2))


def test_a_conv_with_its_batchnorm_folded_by_the_exporter_imports(tmp_path):
    """torch's exporter (constant folding on, its default) folds an eval BatchNorm into the conv and
    names the result ``onnx::Conv_N``; TVM's importer shortens that variable to ``Conv_N``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten()).eval()
    path = tmp_path / "folded.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 5, 5),), str(path), dynamo=False, input_names=["x"])
    imported = from_onnx(path)
    names = [p.name for p in imported.params]
    assert any(n.startswith("onnx::Conv_") for n in names), names
    program = pock_tvm.compile(str(path), None)
    x = np.random.default_rng(0).standard_normal((1, 3, 5, 5)).astype("float32")
    np.testing.assert_allclose(program.predict(x), model(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)
