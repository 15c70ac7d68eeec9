"""Shared checks: train a compiled program and PyTorch side by side and compare."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import pock_tvm
from pock_tvm.options import PipelineOptions
from reference import Reference


def train_both(model, program, optimizer, inputs, target, steps: int = 3, loss_fn=None, units=None):
    ref = Reference(model, program, optimizer, **({"loss_fn": loss_fn} if loss_fn else {}), units=units)
    before = program.state_dict()
    ours, theirs = [], []
    for _ in range(steps):
        ours.append(program.step(*[t.numpy() for t in inputs], target.numpy()))
        theirs.append(ref.step(*inputs, target))
    return before, program.state_dict(), ref.state_dict(), ours, theirs


def assert_matches_torch(model, program, optimizer, inputs, target, rtol=1e-4, update_tol=1e-3, kink_flips=0,
                         loss_fn=None, units=None):
    """Losses and every parameter after 3 steps match autograd; frozen ones are bit-identical.
    ``kink_flips``: how many elements per tensor may differ more (deep nets, see KINK_FLIPS);
    ``loss_fn``: torch's loss (default cross-entropy); ``units``: see :class:`reference.Reference`."""
    before, after, expected, ours, theirs = train_both(model, program, optimizer, inputs, target, loss_fn=loss_fn,
                                                       units=units)
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=1e-6)
    trainable = {p.source for p in program.layout.params if p.trainable}
    assert trainable, "the scheme must update something"
    # The absolute floor is update_tol (0.1%) of the largest update in the model: updates are small next to
    # the weights, so a wrong gradient cannot hide behind rtol, and elements that cross zero
    # (Adam moves every element by ~lr) still have a scale.
    scale = max(float(np.abs(expected[n] - before[n]).max()) for n in trainable)
    assert scale > 0
    for name, value in after.items():
        if name not in trainable:
            assert np.array_equal(value, before[name]), f"frozen {name} changed"
            continue
        off = ~np.isclose(value, expected[name], rtol=rtol, atol=update_tol * scale)
        if 0 < off.sum() <= kink_flips:
            continue
        np.testing.assert_allclose(value, expected[name], rtol=rtol, atol=update_tol * scale, err_msg=name)
    return ours


# In a deep float32 net a ReLU6 input within rounding of 0 or 6 can fall on the other side in TVM's
# kernels than in torch's (FMA and summation order differ), which moves the gradient of the channel
# it feeds: seen for one of 1280 BN biases of MobileNetV2 (batch 2, 4x4 maps: one of 32 terms of the
# sum). Deep tests allow that many elements per tensor off; a wrong rule moves many more.
KINK_FLIPS = 2


def labels(batch: int, classes: int = 10) -> torch.Tensor:
    return torch.randint(0, classes, (batch,))


SGD = pock_tvm.SGD(lr=0.05, momentum=0.9, weight_decay=1e-4)
ADAM = pock_tvm.Adam(lr=1e-3, weight_decay=1e-4)
# In deep ReLU/ReLU6 nets, float32 activations a hair from a kink (x ~ 0) can fall on the other
# side in TVM's kernels than in torch's (different summation order), which moves tiny early-layer
# gradients (~1e-9 at init) by ~1e-3 relative. Adam with eps=1e-8 divides by sqrt(v) ~ |g| and
# turns that into visible update noise; eps=1e-6 keeps the comparison about our math.
ADAM_DEEP = pock_tvm.Adam(lr=1e-3, eps=1e-6, weight_decay=1e-4)


def assert_setting_keeps_numbers(model, x, y, optimizer, scheme, setting: str, rtol: float = 1e-6):
    """Three steps with a pipeline ``setting`` on and off give the same losses and parameters
    (``rtol`` above float32 rounding for settings that reassociate arithmetic)."""
    runs = []
    for value in (True, False):
        options = PipelineOptions() if value else PipelineOptions().without(setting)
        program = pock_tvm.compile(model, (x,), scheme=scheme, optimizer=optimizer, options=options)
        losses = [program.step(x.numpy(), y.numpy()) for _ in range(3)]
        runs.append((losses, program.state_dict()))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=rtol)
    for name, value in runs[0][1].items():
        np.testing.assert_allclose(value, runs[1][1][name], rtol=rtol, atol=rtol / 10, err_msg=name)


_CROSS_TOOLS = ("aarch64-linux-gnu-g++", "qemu-aarch64-static", "cmake")
_missing_cross = [t for t in _CROSS_TOOLS if shutil.which(t) is None]
needs_cross_tools = pytest.mark.skipif(
    bool(_missing_cross), reason=f"needs {_missing_cross} (`make test` installs them when run as root)")
needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("g++") is None,
                                 reason="needs cmake and g++ to build the host runner (`make test` installs cmake)")


# A tiny Llama: grouped-query attention (4 query heads, 2 key/value heads) and tied input/output
# embeddings, as SmolLM2; RMSNorm, rotary embeddings, SwiGLU
TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def tiny_llama(**overrides):
    """``CausalLMLogits`` over a randomly initialised ``LlamaForCausalLM`` of :data:`TINY_LLAMA`
    (with ``overrides``), eval mode; skips the test where ``transformers`` is missing."""
    transformers = pytest.importorskip("transformers")
    from pock_tvm.models.hf import CausalLMLogits

    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    return CausalLMLogits(transformers.LlamaForCausalLM(config)).eval()
