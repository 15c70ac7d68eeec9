"""Program: predict, state dicts, save/load (atomic) and input checking at step()."""

import numpy as np
import pytest
import torch

import pock_tvm
from pock_tvm.options import PipelineOptions
from pock_tvm.models import MLP
from pock_tvm.runtime import bundle as bundle_module


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    model = MLP()
    x, y = torch.randn(4, 32), torch.randint(0, 10, (4,))
    scheme = pock_tvm.Scheme(rules=[pock_tvm.Rule("fc2.weight", "partial", 0.5), pock_tvm.Rule("fc3", "full")])
    program = pock_tvm.compile(model, (x,), scheme=scheme, optimizer=pock_tvm.Adam(lr=1e-2))
    return model, program, x.numpy(), y.numpy()


def test_predict_matches_torch(setup):
    model, program, x, _ = setup
    np.testing.assert_allclose(program.predict(x), model(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_state_dict_has_source_names_and_reassembles_partial_weights(setup):
    model, program, x, y = setup
    state = program.state_dict()
    assert set(state) == set(model.state_dict())
    assert state["fc2.weight"].shape == (64, 64)
    program.step(x, y)
    after = program.state_dict()
    assert not np.array_equal(after["fc2.weight"][:, :32], state["fc2.weight"][:, :32])
    assert np.array_equal(after["fc2.weight"][:, 32:], state["fc2.weight"][:, 32:])


def test_load_state_dict_round_trip_and_errors(setup):
    model, folded, x, y = setup
    scheme = pock_tvm.Scheme(rules=[pock_tvm.Rule("fc2.weight", "partial", 0.5), pock_tvm.Rule("fc3", "full")])
    program = pock_tvm.compile(model, (x,), scheme=scheme, optimizer="adam",
                               options=PipelineOptions(fold_frozen=False))
    fresh = {k: v.detach().numpy() * 0.5 for k, v in model.state_dict().items()}
    program.load_state_dict(fresh)
    for key, value in program.state_dict().items():
        np.testing.assert_array_equal(value, fresh[key])
    with pytest.raises(ValueError, match=r"missing keys \['fc1.bias'\]"):
        program.load_state_dict({k: v for k, v in fresh.items() if k != "fc1.bias"})
    with pytest.raises(ValueError, match=r"'fc1.bias' has shape \(3,\), expected \(64,\)"):
        program.load_state_dict({**fresh, "fc1.bias": np.zeros(3, "float32")})
    folded.load_state_dict(folded.state_dict())  # same frozen values: accepted
    with pytest.raises(ValueError, match=r"'fc1.weight' is frozen and folded .* fold_frozen=False"):
        folded.load_state_dict(fresh)


def test_save_load_continues_training_identically(setup, tmp_path):
    _, program, x, y = setup
    program.step(x, y)
    program.save(tmp_path / "prog")
    loaded = pock_tvm.load(tmp_path / "prog")
    assert loaded.steps_done == 1
    assert [program.step(x, y) for _ in range(2)] == [loaded.step(x, y) for _ in range(2)]
    for key, value in program.state_dict().items():
        np.testing.assert_array_equal(value, loaded.state_dict()[key])
    assert str(loaded.report()) == str(program.report())


def test_failed_save_leaves_the_previous_program_intact(setup, tmp_path, monkeypatch):
    _, program, x, y = setup
    program.save(tmp_path / "prog")
    before = (tmp_path / "prog" / "params.bin").read_bytes()
    program.step(x, y)

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module, "write_state_file", broken)
    with pytest.raises(OSError, match="disk full"):
        program.save(tmp_path / "prog")
    assert (tmp_path / "prog" / "params.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prog"]  # no temporary left behind
    assert pock_tvm.load(tmp_path / "prog").steps_done == 0


def test_step_rejects_wrong_shape_dtype_and_count(setup):
    _, program, x, y = setup
    with pytest.raises(ValueError, match=r"input 'x' has shape \(3, 32\).*compiled for \(4, 32\)"):
        program.step(x[:3], y)
    with pytest.raises(ValueError, match=r"input 'target' has dtype int32, the program expects int64"):
        program.step(x, y.astype("int32"))
    with pytest.raises(ValueError, match=r"input 'x' has dtype float64"):
        program.step(x.astype("float64"), y)
    with pytest.raises(ValueError, match=r"expected 2 arguments \(x, target\), got 1"):
        program.step(x)



def test_reset_optimizer_starts_a_new_fine_tune(setup):
    _, program, x, y = setup
    start = program.state_dict()
    first = [program.step(x, y) for _ in range(2)]
    program.load_state_dict(start)
    program.reset_optimizer()
    assert program.steps_done == 0
    assert all(not v.any() for v in program.optimizer_state().values())
    assert [program.step(x, y) for _ in range(2)] == first


def test_a_bundle_saved_again_at_the_same_path_loads_its_new_library(tmp_path):
    """The dynamic loader returns the library it first loaded for a path: a bundle replaced with
    ``force`` (another scheme, another step) must still load the step its manifest describes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = np.random.default_rng(0).standard_normal((4, 6)).astype("float32")
    pock_tvm.compile(model, (torch.randn(4, 6),), scheme="last-1").save(tmp_path / "b", force=True)
    first = pock_tvm.load(tmp_path / "b")
    pock_tvm.compile(model, (torch.randn(4, 6),), scheme="full").save(tmp_path / "b", force=True)
    second = pock_tvm.load(tmp_path / "b")
    assert len(second.layout.trainable) == 4 and len(first.layout.trainable) == 2
    y = np.array([0, 1, 2, 0])
    np.testing.assert_allclose(second.predict(x), first.predict(x), rtol=1e-6)
    second.step(x, y)  # the full step runs: its library, not the first one's
