"""Every verb of ``pock-tvm`` with bad arguments: exit 2 and one line naming the problem, never a
traceback (the walk of issue 21); argparse's own refusals exit 2 as well."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pock_tvm.cli.main import main


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bundle"
    assert main(["compile", "mlp", "--scheme", "bias-only", "--input-shape", "4,32", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Data files, good and bad, and two broken ONNX graphs."""
    d = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 32)).astype("float32"), rng.integers(0, 10, 8)
    np.savez(d / "good.npz", x=x, y=y)
    np.savez(d / "digits.npz", x=rng.standard_normal((8, 1, 24, 24)).astype("float32"), y=y)
    np.save(d / "x.npy", x)
    np.savez(d / "strings.npz", x=x, y=np.array(["cat"] * 8))
    np.savez(d / "none.npz", x=x, y=np.array([None] * 8, dtype=object))
    np.savez(d / "float_labels.npz", x=x, y=y + 0.5)
    np.savez(d / "short_y.npz", x=x, y=y[:6])
    np.savez(d / "nan.npz", x=np.where(np.arange(32) == 3, np.nan, x), y=y)
    np.savez(d / "ignored.npz", x=x, y=np.full(8, -100))
    (d / "a_dir").mkdir()
    (d / "a_file").write_text("not a directory")
    # a graph whose two nodes feed each other
    nodes = [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])]
    graph = helper.make_graph(nodes, "cycle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph), d / "cycle.onnx")
    # a weight stored outside the file
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.ones(16, "float32").tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "external",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    model = helper.make_model(graph)
    (d / "model").mkdir()
    onnx.save(model, d / "model" / "external.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    outside = onnx.load(d / "model" / "external.onnx", load_external_data=False)
    for entry in outside.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"  # a path out of the model's directory
    (d / "secret.bin").write_bytes(np.ones(16, "float32").tobytes())
    onnx.save(outside, d / "model" / "escaping.onnx")
    (d / "model" / "weights.bin").rename(d / "model" / "moved.bin")  # external.onnx now misses its data
    return d


def _cases(b, f, tmp):
    """(argv, what the one line must say)."""
    return [
        (["compile", "mlp", "--input-shape", "0,32", "-o", tmp / "o"], "every dimension must be >= 1"),
        (["compile", "mlp", "--input-shape=-8,32", "-o", tmp / "o"], "every dimension must be >= 1"),
        (["compile", "mlp", "--input-shape", "4,32", "--lr", "1e39", "-o", tmp / "o"], "takes a finite number"),
        (["compile", "mlp", "--input-shape", "4,32", "--lr", "nan", "-o", tmp / "o"], "takes a finite number"),
        (["compile", "mlp", "--input-shape", "4,32", "-o", f], "not a pock_tvm bundle"),
        (["compile", "mlp", "--input-shape", "4,32", "-o", f / "a_file" / "sub"], "is a file, not a directory"),
        (["compile", f / "cycle.onnx", "-o", tmp / "o"], "cycle"),
        (["compile", f / "model" / "external.onnx", "-o", tmp / "o"], "external data must be files beside"),
        (["compile", f / "model" / "escaping.onnx", "-o", tmp / "o"], "external data must be files beside"),
        (["compile", f / "missing.onnx", "-o", tmp / "o"], "missing.onnx"),
        (["info", tmp / "missing"], "missing"),
        (["info", f / "a_file"], "a_file"),
        (["train", b, "--data", f / "good.npz", "--epochs", "0"], "takes an integer >= 1"),
        (["train", b, "--data", f / "x.npy"], "not an .npz"),
        (["train", b, "--data", f / "a_dir"], "is not a file"),
        (["train", b, "--data", f / "missing.npz"], "no such data file"),
        (["train", b, "--data", f / "strings.npz"], "strings or objects"),
        (["train", b, "--data", f / "none.npz"], "strings or objects"),
        (["train", b, "--data", f / "float_labels.npz"], "not a whole number"),
        (["train", b, "--data", f / "short_y.npz"], "one target per sample"),
        (["train", b, "--data", f / "nan.npz"], "inputs must be finite"),
        (["train", b, "--data", f / "good.npz", "--lr", "-1"], "takes a finite number"),
        (["train", tmp / "missing", "--data", f / "good.npz"], "missing"),
        (["train", f / "a_file", "--data", f / "good.npz"], "a_file"),
        (["pack-data", b, f / "good.npz", "-o", f / "a_dir"], "is a directory; give a file name"),
        (["pack-data", b, f / "float_labels.npz", "-o", tmp / "d.bin"], "not a whole number"),
        (["run", b, "--data", f / "good.npz", "--rpc", "127.0.0.1:1", "--steps", "-1"], "takes an integer >= 0"),
        (["run", b, "--data", f / "good.npz", "--rpc", "nohostport"], "HOST:PORT"),
        (["tune", "mlp", "--input-shape", "4,32", "--db", f / "a_file"], "a_file"),
        (["tune", "mlp", "--input-shape", "4,32", "--trials", "0"], "takes an integer >= 1"),
        (["profile", b, "--steps", "0"], "takes an integer >= 1"),
        (["profile", tmp / "missing"], "missing"),
        (["search", "digitscnn", "--data", f / "digits.npz", "--budget", "1MB", "-o", f / "a_dir"], "is a directory; give a file name"),
        (["search", "digitscnn", "--data", f / "good.npz", "--budget", "lots", "-o", tmp / "s.toml"], "lots"),
        (["build-runner", "--target", "nosuchboard"], "nosuchboard"),
        (["demo", "--epochs", "0"], "takes an integer >= 1"),
    ]


def test_every_verb_refuses_bad_arguments_in_one_line(bundle, files, tmp_path, capsys):
    failures = []
    for argv, needle in _cases(bundle, files, tmp_path):
        argv = [str(a) for a in argv]
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: usage + "error: argument ...: <message>"
            code = exit_.code
        err = capsys.readouterr().err
        last = (err.strip().splitlines() or [""])[-1]  # argparse prints its usage lines first
        if code != 2 or needle not in last or "Traceback" in err:
            failures.append((argv, code, err.strip()[-300:]))
    assert not failures, "\n".join(map(str, failures))


def test_a_read_only_bundle_trains_with_no_save(bundle, files, tmp_path):
    import shutil

    copy = tmp_path / "ro"
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns(".lock"))
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    os.chmod(copy, 0o555)
    try:
        assert main(["train", str(copy), "--data", str(files / "good.npz"), "--no-save"]) == 0
    finally:
        os.chmod(copy, 0o755)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_ignore_labels_are_refused_by_a_classifier(bundle, files, capsys):
    """-100 means "ignore" to a next-token loss only (tests/test_loss.py); a classifier refuses it."""
    assert main(["train", str(bundle), "--data", str(files / "ignored.npz"), "--no-save"]) == 2
    assert "label -100 at position 0 is outside [0, 10)" in capsys.readouterr().err


def test_the_api_refuses_an_empty_batch_and_a_learning_rate_float32_cannot_hold():
    import torch

    import pock_tvm
    from pock_tvm.models import MLP

    with pytest.raises(ValueError, match=r"input 'x' has shape \(0, 32\); every dimension must be >= 1"):
        pock_tvm.compile(MLP(), (torch.zeros(0, 32),))
    program = pock_tvm.compile(MLP(), (torch.zeros(2, 32),), scheme="bias-only")
    with pytest.raises(ValueError, match=r"learning rate must be a finite number >= 0 that float32 holds \(<= 3.4e\+38\), got 1e\+39"):
        program.step(np.zeros((2, 32), "float32"), np.array([0, 1]), lr=1e39)
