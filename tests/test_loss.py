"""Losses as Relax functions: the next-token loss against torch, and the errors for wrong shapes."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from pock_tvm.frontend.model import TensorSpec
from pock_tvm.loss import NextTokenCrossEntropy, make_loss


def _run(func, *arrays):
    exe = tvm.compile(tvm.IRModule({"loss": func}), target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(exe, tvm.cpu())["loss"](*map(tvm.runtime.tensor, arrays)).numpy()


def test_next_token_loss_shifts_and_ignores_padding_like_hugging_face():
    logits = np.random.default_rng(0).standard_normal((2, 6, 11)).astype("float32")
    labels = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, -100, -100, -100]], "int64")
    loss = NextTokenCrossEntropy()
    ours = _run(loss.relax_function(TensorSpec("output", (2, 6, 11), "float32")), logits, labels)
    t = torch.tensor(logits)
    theirs = torch.nn.functional.cross_entropy(t[:, :-1].reshape(-1, 11), torch.tensor(labels)[:, 1:].reshape(-1))
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
    assert loss.target_spec(TensorSpec("output", (2, 6, 11), "float32")) == TensorSpec("target", (2, 6), "int64")


class _TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 8)
        self.head = torch.nn.Linear(8, 11)

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_an_all_ignored_batch_trains_nothing_and_stays_finite():
    """Labels all -100 (a batch of padding): the mean over no position is 0 with no gradient, as
    torch's gradient is; "mean" over zero positions would be 0/0 and turn every parameter into NaN."""
    import pock_tvm

    torch.manual_seed(0)
    ids = np.random.default_rng(0).integers(0, 11, (2, 6))
    program = pock_tvm.compile(_TinyLM(), (torch.from_numpy(ids),), scheme="full", loss="next_token",
                               optimizer=pock_tvm.SGD(lr=0.5))
    before = {k: v.copy() for k, v in program.state_dict().items()}
    assert program.step(ids, np.full((2, 6), -100)) == 0.0
    after = program.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    labels = ids.copy()
    labels[1] = -100  # half the batch counts: the mean over the counted positions, as torch
    model = _TinyLM()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in before.items()})
    logits = model(torch.from_numpy(ids))
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11),
                                                 torch.from_numpy(labels)[:, 1:].reshape(-1))
    np.testing.assert_allclose(program.step(ids, labels), expected.item(), rtol=1e-5)


def test_next_token_loss_needs_sequence_logits():
    with pytest.raises(ValueError, match=r"NextTokenCrossEntropy: needs \(batch, sequence >= 2, vocab\) logits, "
                                         r"the model returns \(4, 10\); use loss='cross_entropy'"):
        NextTokenCrossEntropy().target_spec(TensorSpec("output", (4, 10), "float32"))


def test_loss_names():
    assert isinstance(make_loss("next_token"), NextTokenCrossEntropy)
    with pytest.raises(ValueError, match=r"unknown loss 'lm'; use one of cross_entropy, ce, next_token, mse"):
        make_loss("lm")
