"""The CUDA step on a machine with an NVIDIA GPU matches the host step (skipped where none exists)."""

import numpy as np
import pytest
import torch
import tvm

import pock_tvm
from pock_tvm.models import SmallCNN
from helpers import tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not tvm.cuda().exist, reason="no NVIDIA GPU here")]


def test_cuda_step_matches_the_host(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 16, 16)).astype("float32")
    y = np.array([1, 7])
    runs = []
    for target in ("host", "cuda"):
        torch.manual_seed(0)
        program = pock_tvm.compile(SmallCNN(), (torch.zeros(2, 3, 16, 16),), scheme="last-2",
                                   optimizer=pock_tvm.Adam(lr=1e-2), target=target)
        runs.append(([program.step(x, y) for _ in range(3)], program.state_dict(), program))
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-4)
    for name, value in runs[0][1].items():
        np.testing.assert_allclose(runs[1][1][name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    loaded = pock_tvm.load(runs[1][2].save(tmp_path / "cuda"))  # the bundle loads back on the GPU
    np.testing.assert_allclose(loaded.step(x, y), runs[1][2].step(x, y), rtol=1e-5)


def test_cuda_causal_lm_step_matches_the_host():
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100).numpy()
    runs = []
    for target in ("host", "cuda"):
        program = pock_tvm.compile(model, (ids, mask), scheme="lora", loss="next_token",
                                   optimizer=pock_tvm.Adam(lr=1e-2), target=target)
        runs.append(([program.step(ids.numpy(), mask.numpy(), labels) for _ in range(3)], program.state_dict()))
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-4)
    for name, value in runs[0][1].items():
        np.testing.assert_allclose(runs[1][1][name], value, rtol=1e-4, atol=1e-5, err_msg=name)
