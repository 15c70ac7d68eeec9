"""The frozen-prefix cache: a fine-tune from cached activations equals the fine-tune without one
(float32), within the rounding of the storage (float16, int8), and every refusal says why."""

import numpy as np
import pytest
import torch

import pock_tvm
from pock_tvm.models import MLP
from pock_tvm.scheme import Rule, Scheme
from pock_tvm.training.finetune import fit
from helpers import tiny_llama

LAST = Scheme("last", rules=[Rule("fc3", "full")])


def _data(n=18, features=32, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, features)).astype("float32"), rng.integers(0, classes, n)


@pytest.fixture(scope="module")
def mlp_runs():
    """One program (compiled with its prefix function), fine-tuned from the same start without a
    cache and with each storage: ``{storage: (fit result, state dict)}``, and the program."""
    torch.manual_seed(0)
    x, y = _data()
    program = pock_tvm.compile(MLP(), (torch.from_numpy(x[:4]),), scheme=LAST, optimizer=pock_tvm.Adam(lr=1e-2),
                               prefix_cache=True)
    start = program.state_dict()
    out = {}
    for storage in (None, "float32", "float16", "int8"):
        program.load_state_dict(start)
        program.reset_optimizer()
        result = fit(program, x, y, epochs=3, prefix_cache=storage)
        out[storage] = (result, program.state_dict())
    return out, program


def test_float32_cache_gives_the_numbers_of_the_plain_fine_tune(mlp_runs):
    runs, program = mlp_runs
    (plain, plain_state), (cached, cached_state) = runs[None], runs["float32"]
    assert program.has_prefix and len(cached.losses) == len(plain.losses) == 12
    np.testing.assert_allclose(cached.losses, plain.losses, rtol=1e-5)
    for name, value in plain_state.items():
        np.testing.assert_allclose(cached_state[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    assert cached.cache_bytes == 18 * program.report().planned["cached_bytes_per_sample"]
    assert program.report().planned["train_step_cached"] < program.report().planned["train_step"]


def test_smaller_storage_rounds_within_its_precision_and_holds_less(mlp_runs):
    runs, program = mlp_runs
    plain = np.array(runs[None][0].losses)
    f16, i8 = runs["float16"][0], runs["int8"][0]
    np.testing.assert_allclose(f16.losses, plain, rtol=2e-3)
    np.testing.assert_allclose(i8.losses, plain, rtol=3e-2)
    assert not np.allclose(i8.losses, plain, rtol=1e-6)  # the int8 rounding is really there
    per_sample = program.report().planned["cached_bytes_per_sample"]
    assert f16.cache_bytes == 18 * per_sample // 2
    assert i8.cache_bytes < 18 * per_sample // 3  # one byte per value plus a scale per row


@pytest.mark.slow  # make test-all: three compiles of a tiny Llama (the MLP tests cover the feature)
def test_causal_lm_with_its_mask_in_the_cache():
    """A tiny Llama, last block trained, next-token loss: the cached activations include the
    attention mask (-inf above the diagonal), which float32 keeps and int8 keeps in float32."""
    model = tiny_llama(num_hidden_layers=3)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (6, 8)).astype("int64")
    mask = np.ones_like(ids)
    scheme = Scheme("last-block", rules=[Rule("@last-blocks:2", "full")])  # the last layer and the final norm
    example = (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2]))
    losses = {}
    for storage in (None, "float32", "int8"):
        program = pock_tvm.compile(model, example, scheme=scheme, loss="next_token", optimizer=pock_tvm.Adam(lr=1e-3),
                                   prefix_cache=storage is not None)
        losses[storage] = fit(program, (ids, mask), ids, epochs=2, prefix_cache=storage).losses
    assert any(np.isinf(c).any() for c in program.prefix(ids[:2], mask[:2]))
    np.testing.assert_allclose(losses["float32"], losses[None], rtol=1e-5)
    np.testing.assert_allclose(losses["int8"], losses[None], rtol=2e-2)


def test_refusals_name_the_reason_and_the_fix():
    x, y = _data()
    torch.manual_seed(0)
    plain = pock_tvm.compile(MLP(), (torch.from_numpy(x[:4]),), scheme=LAST)
    with pytest.raises(ValueError, match=r"no frozen-prefix function; compile with prefix_cache=True"):
        fit(plain, x, y, 1, prefix_cache="float32")
    first = pock_tvm.compile(MLP(), (torch.from_numpy(x[:4]),), scheme=Scheme("first", rules=[Rule("fc1", "full")]),
                             prefix_cache=True)
    assert not first.has_prefix
    assert any("nothing to cache" in n for n in first.report().notes)
    with pytest.raises(ValueError, match="the compiler made none: .*nothing to cache"):
        fit(first, x, y, 1, prefix_cache="float32")
    cached = pock_tvm.compile(MLP(), (torch.from_numpy(x[:4]),), scheme=LAST, prefix_cache=True)
    with pytest.raises(ValueError, match="storage 'bfloat16' is not one of float32, float16, int8"):
        fit(cached, x, y, 1, prefix_cache="bfloat16")


class BatchCentred(torch.nn.Module):
    """Frozen layers that subtract the batch mean: each sample's activations depend on the others."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(32, 16), torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x - x.mean(0, keepdim=True))))


def test_activations_that_mix_the_batch_are_refused_when_the_cache_is_filled():
    x, y = _data()
    program = pock_tvm.compile(BatchCentred(), (torch.from_numpy(x[:4]),),
                               scheme=Scheme("head", rules=[Rule("fc2", "full")]), prefix_cache=True)
    assert program.has_prefix  # the shapes are batch-major; only the numbers tell
    with pytest.raises(ValueError, match="mixes the samples of a batch"):
        fit(program, x, y, 1, prefix_cache="float32")


def test_saved_bundle_keeps_the_prefix_functions(tmp_path):
    x, y = _data()
    torch.manual_seed(0)
    program = pock_tvm.compile(MLP(), (torch.from_numpy(x[:4]),), scheme=LAST, prefix_cache=True)
    program.save(tmp_path / "b")
    loaded = pock_tvm.load(tmp_path / "b")
    assert loaded.has_prefix
    cached = loaded.prefix(x[:4])
    np.testing.assert_array_equal(cached[0], program.prefix(x[:4])[0])
    assert loaded.step_cached(*cached, y[:4]) == pytest.approx(program.step(x[:4], y[:4]), rel=1e-6)
