"""Schemes: presets, files, shortcuts, partial channels and the errors a user sees."""

import json

import pytest
import torch

import pock_tvm
from pock_tvm.frontend import from_torch
from pock_tvm.models import MobileNetV2, SmallCNN
from pock_tvm.scheme import Update


@pytest.fixture(scope="module")
def cnn():
    return from_torch(SmallCNN(), torch.randn(2, 3, 16, 16))


@pytest.fixture(scope="module")
def mbv2():
    return from_torch(MobileNetV2(width_mult=0.35, num_classes=10), torch.randn(1, 3, 64, 64))


def trained(updates):
    return sorted(n for n, u in updates.items() if u.mode != "frozen")


def test_full_updates_every_parameter_but_never_buffers(cnn):
    updates = pock_tvm.Scheme.preset("full").resolve(cnn)
    assert all(u.mode == "full" for u in updates.values())
    assert not any("running" in name for name in updates)


def test_bias_only(cnn):
    assert trained(pock_tvm.Scheme.preset("bias-only").resolve(cnn)) == [
        "classifier.bias", "features.0.1.bias", "features.1.1.bias", "features.2.1.bias"]


def test_last_k_counts_blocks(cnn):
    assert trained(pock_tvm.Scheme.preset("last-2").resolve(cnn)) == [
        "classifier.bias", "classifier.weight", "features.2.0.weight", "features.2.1.bias",
        "features.2.1.weight"]
    with pytest.raises(ValueError, match="last-k needs 1 <= k <= 4"):
        pock_tvm.Scheme.preset("last-9").resolve(cnn)


def test_bias_last_n_and_norm_affine(cnn):
    scheme = pock_tvm.Scheme(bias=1, norm_affine=True)
    assert trained(scheme.resolve(cnn)) == [
        "classifier.bias", "features.0.1.bias", "features.0.1.weight", "features.1.1.bias",
        "features.1.1.weight", "features.2.1.bias", "features.2.1.weight"]


def test_partial_channels(mbv2):
    updates = pock_tvm.Scheme.preset("tte-mbv2").resolve(mbv2)
    # expansion conv (56 -> 336 channels at w0.35): first ceil(0.5 * 56) input channels
    assert updates["features.17.conv.0.0.weight"] == Update("partial", 1, 28)
    dw = pock_tvm.Scheme(rules=[pock_tvm.Rule("features.5.conv.1.0.weight", "partial", 0.3)])
    assert dw.resolve(mbv2)["features.5.conv.1.0.weight"] == Update("partial", 0, 29)  # ceil(96 * 0.3)
    with pytest.raises(ValueError, match="partial update of 'features.5.conv.1.1.weight'.*norm"):
        pock_tvm.Scheme(rules=[pock_tvm.Rule("features.5.conv.1.1.weight", "partial", 0.5)]).resolve(mbv2)


def test_unknown_name_lists_close_matches(mbv2):
    scheme = pock_tvm.Scheme(rules=[pock_tvm.Rule("features.17.conv.0.weight")])
    with pytest.raises(ValueError, match=r"matches no parameter; did you mean .*features\.17\.conv\.0"):
        scheme.resolve(mbv2)


def test_bad_mode_and_ratio():
    with pytest.raises(ValueError, match="mode 'half'"):
        pock_tvm.Rule("fc", "half")
    with pytest.raises(ValueError, match="0 < ratio <= 1"):
        pock_tvm.Rule("fc", "partial", 1.5)
    with pytest.raises(ValueError, match="unknown preset 'sparse'"):
        pock_tvm.Scheme.load("sparse")


def test_toml_and_json_files(tmp_path, cnn):
    toml = tmp_path / "s.toml"
    toml.write_text('name = "mine"\nbias = "all"\n\n[[rules]]\nselect = "classifier"\nmode = "full"\n\n'
                    '[[rules]]\nselect = "features.2.0.weight"\nmode = "partial"\nratio = 0.5\n')
    from_toml = pock_tvm.Scheme.load(toml)
    updates = from_toml.resolve(cnn)
    assert from_toml.name == "mine"
    assert updates["features.2.0.weight"] == Update("partial", 1, 8)
    assert updates["classifier.weight"].mode == "full"
    as_json = tmp_path / "s.json"
    as_json.write_text(json.dumps(from_toml.to_dict()))
    assert pock_tvm.Scheme.load(as_json).resolve(cnn) == updates
    with pytest.raises(ValueError, match="no such file"):
        pock_tvm.Scheme.load(tmp_path / "missing.toml")


@pytest.mark.parametrize("text, message", [
    ('norm_affine = "false"', r"field 'norm_affine' must be true or false \(not a string\), got 'false'"),
    ('default = "half"', r"field 'default' must be one of full, partial, frozen, got 'half'"),
    ('bias = -2', r"field 'bias' must be \"all\", \"none\" or a count"),
    ('[[rule]]\nselect = "classifier"', r"unknown field 'rule'; did you mean 'rules'\?"),
    ('[[rules]]\nselect = "classifier"\nmode = "partial"\nratio = "0.5"',
     r"field 'rules\[0\].ratio' must be a number in \(0, 1\] \(not a string\), got '0.5'"),
    ('[[rules]]\nmode = "full"', r"'rules\[0\].select' is missing"),
    ('[[rules]]\nselect = "fc"\nmod = "full"', r"unknown field 'rules\[0\].mod'; did you mean 'rules\[0\].mode'"),
    ('bias = [1', r"not valid TOML"),
])
def test_malformed_scheme_files_name_the_file_the_field_and_what_it_accepts(tmp_path, text, message):
    path = tmp_path / "scheme.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"Scheme '.*scheme.toml'(: | ){message}"):
        pock_tvm.Scheme.load(path)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"'.*list.json': the file must hold a table"):
        pock_tvm.Scheme.load(tmp_path / "list.json")
