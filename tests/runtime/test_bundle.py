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
