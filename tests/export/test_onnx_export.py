"""`pock-tvm export`: a fine-tuned bundle back into ONNX, read by ONNX Runtime."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import pock_tvm
from pock_tvm.cli.main import main
from pock_tvm.runtime.program import Program


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = Net().eval()
    torch.onnx.export(model, (torch.randn(4, 3, 8, 8),), str(root / "net.onnx"), dynamo=False, opset_version=13,
                      input_names=["x"])
    assert main(["compile", str(root / "net.onnx"), "-o", str(root / "bundle"), "--scheme", "last-1", "--lr", "0.5"]) == 0
    program = Program.load(root / "bundle")
    rng = np.random.default_rng(0)
    for _ in range(3):
        program.step(rng.standard_normal((4, 3, 8, 8)).astype("float32"), rng.integers(0, 5, 4))
    program.save(root / "bundle", force=True)
    return root, program


def test_export_writes_the_trained_initializers_and_runtime_agrees(trained, capsys):
    import onnxruntime as ort

    root, program = trained
    assert main(["export", str(root / "bundle"), "-o", str(root / "tuned.onnx")]) == 0
    assert "ONNX Runtime agrees with the bundle" in capsys.readouterr().out
    tuned = onnx.load(str(root / "tuned.onnx"))
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(root / "net.onnx")).graph.initializer}
    values = {i.name: numpy_helper.to_array(i) for i in tuned.graph.initializer}
    changed = [k for k in program.state_dict() if k in original and not np.array_equal(values[k], original[k])]
    assert changed, "the fine-tuned initializers are in the file"
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype("float32")
    got = ort.InferenceSession(str(root / "tuned.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, program.predict(x), rtol=1e-4, atol=1e-5)


def test_export_refuses_to_overwrite_and_names_the_fix(trained, capsys):
    root, _ = trained
    (root / "exists.onnx").write_bytes(b"mine")
    assert main(["export", str(root / "bundle"), "-o", str(root / "exists.onnx")]) == 2
    assert "exists; choose another path or pass --force" in capsys.readouterr().err
    assert (root / "exists.onnx").read_bytes() == b"mine"


def test_quantize_writes_a_qdq_model_that_pock_tvm_trains(trained, capsys):
    root, _ = trained
    rng = np.random.default_rng(2)
    np.savez(root / "calib.npz", x=rng.standard_normal((32, 3, 8, 8)).astype("float32"))
    assert main(["quantize", str(root / "net.onnx"), "--calibration", str(root / "calib.npz"),
                 "-o", str(root / "int8.onnx")]) == 0
    out = capsys.readouterr().out
    assert "quantized tensors" in out and "agrees with the float model's" in out
    proto = onnx.load(str(root / "int8.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert weights, "the conv weight is stored as int8"
    program = pock_tvm.compile(str(root / "int8.onnx"), None, scheme="last-1")
    import onnxruntime as ort

    x = rng.standard_normal((4, 3, 8, 8)).astype("float32")
    expected = ort.InferenceSession(str(root / "int8.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(program.predict(x), expected, rtol=1e-2, atol=2e-2)


def test_quantize_names_missing_calibration_inputs(trained, capsys):
    root, _ = trained
    np.savez(root / "bad.npz", a=np.zeros((4, 3, 8, 8), "float32"), b=np.zeros(4, "float32"))
    assert main(["quantize", str(root / "net.onnx"), "--calibration", str(root / "bad.npz"),
                 "-o", str(root / "never.onnx")]) == 2
    assert "lacks inputs ['x']" in capsys.readouterr().err
    assert not (root / "never.onnx").exists()


def test_a_torch_model_exports_with_its_fine_tuned_parameters():
    from pock_tvm.export.onnx_export import check_with_onnxruntime, torch_onnx
    from pock_tvm.export.state import fine_tuned_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    program = pock_tvm.compile(model, (torch.randn(4, 6),), scheme="last-1", optimizer=pock_tvm.SGD(lr=0.5))
    rng = np.random.default_rng(0)
    for _ in range(3):
        program.step(rng.standard_normal((4, 6)).astype("float32"), rng.integers(0, 3, 4))
    proto = torch_onnx(model, (torch.zeros(4, 6),), fine_tuned_state(program))
    assert check_with_onnxruntime(proto, program) < 1e-5
    x = torch.from_numpy(rng.standard_normal((4, 6)).astype("float32"))
    assert np.abs(program.predict(x.numpy()) - model(x).detach().numpy()).max() > 1e-3, "the user's model is unchanged"
    with pytest.raises(ValueError, match=r"are not in the torch model: export with the model the bundle"):
        torch_onnx(torch.nn.Linear(6, 3), (torch.zeros(4, 6),), fine_tuned_state(program))
