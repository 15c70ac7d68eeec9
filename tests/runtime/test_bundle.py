"""The bundle format: Python writes and reads it; damaged or foreign bundles give clear errors."""

import json

import numpy as np
import pytest
import torch

import pock_tvm
from pock_tvm.models import MLP
from pock_tvm.runtime.bundle import FORMAT, read_manifest, read_state


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    program = pock_tvm.compile(MLP(), (torch.randn(4, 32),), scheme="last-2", optimizer="adam")
    path = program.save(tmp_path_factory.mktemp("b") / "bundle")
    return program, path


def test_manifest_describes_every_tensor_at_its_offset(bundle):
    program, path = bundle
    manifest = read_manifest(path)
    assert manifest["format"] == FORMAT and manifest["library"] == "lib.so"
    assert manifest["target"]["name"] == "host"
    roles = [t["role"] for t in manifest["tensors"]]
    assert roles == ["param"] * len(program.layout.params) + ["step"] + ["state"] * len(program.layout.state_keys())
    assert [t["passed"] for t in manifest["tensors"] if t["role"] == "param"] == \
        [not p.folded for p in program.layout.params]
    raw = (path / "params.bin").read_bytes()
    last = manifest["tensors"][-1]
    assert len(raw) == last["offset"] + last["nbytes"]
    values = read_state(path, manifest)
    for name, value in program.state_dict().items():
        np.testing.assert_array_equal(pock_tvm.load(path).state_dict()[name], value)
    assert values["step"].shape == ()


def test_changed_file_is_a_hash_mismatch(bundle, tmp_path):
    _, path = bundle
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "params.bin").read_bytes())
    data[0] ^= 1
    (copy / "params.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"params.bin does not match its SHA-256 in manifest.json"):
        pock_tvm.load(copy)
    (copy / "lib.so").unlink()
    with pytest.raises(ValueError, match=r"missing lib.so, named in manifest.json"):
        pock_tvm.load(copy)


def test_bundle_for_another_machine_is_refused_here(bundle, tmp_path):
    _, path = bundle
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["target"] = {**manifest["target"], "name": "rpi4", "arch": "aarch64"}
    copy = tmp_path / "rpi"
    copy.mkdir()
    for f in path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"built for rpi4 \(aarch64, linux, cpu\).*device runner"):
        pock_tvm.load(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(ValueError, match=r"has no manifest.json"):
        pock_tvm.load(tmp_path)


def test_save_refuses_a_directory_that_is_not_a_bundle(bundle, tmp_path):
    program, _ = bundle
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match=r"'.*mine' is a directory that is not a pock_tvm bundle \(it holds "
                                         r"thesis.tex\); nothing was written.*force=True"):
        program.save(mine)
    assert (mine / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        program.save(tmp_path / "file")
    program.save(mine, force=True)
    assert not (mine / "thesis.tex").exists() and pock_tvm.load(mine).steps_done == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]  # nothing left beside it


def test_saving_over_a_bundle_swaps_it_in_one_step(bundle, tmp_path, monkeypatch):
    from pock_tvm.runtime import files

    program, _ = bundle
    dest = program.save(tmp_path / "b")
    swaps = []
    real = files._exchange
    monkeypatch.setattr(files, "_exchange", lambda a, b: swaps.append((a, b)) or real(a, b))
    program.step(np.zeros((4, 32), "float32"), np.zeros(4, "int64"))
    program.save(dest)
    assert len(swaps) == 1 and swaps[0][1] == dest  # renameat2(RENAME_EXCHANGE): never a moment without a bundle
    assert pock_tvm.load(dest).steps_done == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_non_finite_state_is_never_written(bundle, tmp_path):
    program, _ = bundle
    copy = pock_tvm.load(program.save(tmp_path / "b"))
    before = (tmp_path / "b" / "params.bin").read_bytes()
    x = np.full((4, 32), 1e30, "float32")
    for _ in range(3):
        copy.step(x, np.zeros(4, "int64"), lr=1e30)
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in the state, nothing was written: "
                                         r"'fc\d.(weight|bias)'"):
        copy.save(tmp_path / "b")
    assert (tmp_path / "b" / "params.bin").read_bytes() == before


def test_learning_rates_and_hyperparameters_are_checked(bundle):
    program, _ = bundle
    x, y = np.zeros((4, 32), "float32"), np.zeros(4, "int64")
    for bad in (float("nan"), -0.1, float("inf")):
        with pytest.raises(ValueError, match=r"learning rate must be a finite number >= 0"):
            program.step(x, y, lr=bad)
    with pytest.raises(ValueError, match=r"SGD.momentum must be a finite number in \[0, 1\), got 1.5"):
        pock_tvm.SGD(momentum=1.5)
    with pytest.raises(ValueError, match=r"Adam.lr must be a finite number >= 0 that float32 holds \(<= 3.4e\+38\), got -0.001"):
        pock_tvm.Adam(lr=-1e-3)


def test_manifest_records_the_calling_convention_the_library_has(bundle, tmp_path):
    _, path = bundle
    manifest = read_manifest(path)
    call = manifest["calling"]["train_step"]
    assert call["args"][0] == "x" and call["args"][-1].endswith(".exp_avg_sq")
    assert call["outputs"][0] == "loss" and "step" in call["outputs"]
    # a manifest from another compile of the same model would pass the hashes but not the library
    other = tmp_path / "other"
    other.mkdir()
    for f in path.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    torch.manual_seed(0)
    foreign = pock_tvm.compile(MLP(), (torch.randn(4, 32),), scheme="last-1", optimizer="adam").save(tmp_path / "f")
    (other / "lib.so").write_bytes((foreign / "lib.so").read_bytes())
    manifest["files"]["lib.so"] = json.loads((foreign / "manifest.json").read_text())["files"]["lib.so"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"the library's train_step takes .* the manifest does not belong"):
        pock_tvm.load(other)
