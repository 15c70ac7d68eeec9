"""PipelineOptions: presets are cumulative, unknown names are errors."""

import dataclasses

import pytest

from pock_tvm.options import PRESETS, PipelineOptions


def test_presets_add_optimizations_level_by_level():
    levels = [dataclasses.astuple(PRESETS[f"O{i}"]) for i in range(4)]
    count = len(dataclasses.fields(PipelineOptions))
    assert levels[0] == (False,) * count and levels[3] == (True,) * count
    for lower, higher in zip(levels, levels[1:]):
        assert all(h or not lo for lo, h in zip(lower, higher)) and sum(higher) > sum(lower)
    assert PipelineOptions.load(None) == PipelineOptions() == PRESETS["O3"]
    assert PipelineOptions.load("O1").fold_frozen and not PipelineOptions.load("O1").in_place


def test_unknown_level_or_optimization_is_an_error():
    with pytest.raises(ValueError, match=r"unknown level 'O4'; choose one of O0, O1, O2, O3"):
        PipelineOptions.load("O4")
    with pytest.raises(ValueError, match=r"unknown optimization \['fold'\]"):
        PipelineOptions().without("fold")
    assert PipelineOptions().without("in_place") == PipelineOptions(in_place=False)


def test_a_new_optimizer_is_added_in_one_place(monkeypatch, tmp_path):
    """A dataclass with name, lr, state_names() and emit(), put in OPTIMIZERS: compile takes it by
    name, the step applies it, and a saved bundle loads it back."""
    from dataclasses import dataclass

    import numpy as np
    import torch

    import pock_tvm
    from pock_tvm import optim
    from pock_tvm.models import MLP

    @dataclass
    class SignSGD:
        lr: float = 0.01
        name: str = "signsgd"

        def state_names(self):
            return ()

        def emit(self, bb, param, grad, states, step, lr, unit=None):
            R = optim._ops()
            return bb.emit(R.subtract(param, R.multiply(lr, R.sign(grad)))), []

    monkeypatch.setitem(optim.OPTIMIZERS, "signsgd", SignSGD)
    torch.manual_seed(0)
    program = pock_tvm.compile(MLP(), (torch.zeros(4, 32),), scheme="bias-only", optimizer="signsgd")
    before = program.state_dict()["fc3.bias"].copy()  # the logits bias: no gradient is exactly 0
    program.step(np.random.default_rng(0).standard_normal((4, 32)).astype("float32"), np.array([0, 1, 2, 3]), lr=0.5)
    assert np.allclose(np.abs(program.state_dict()["fc3.bias"] - before), 0.5)  # every entry moved by lr
    assert pock_tvm.load(program.save(tmp_path / "b")).layout.optimizer["name"] == "signsgd"
    assert optim.make_optimizer("signsgd", lr=0.2) == SignSGD(lr=0.2)
