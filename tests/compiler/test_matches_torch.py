"""Compiled training steps against PyTorch autograd: MLP, MobileNetV2, ResNet-18, each scheme."""

import pytest
import torch

import pock_tvm
from helpers import ADAM, ADAM_DEEP, KINK_FLIPS, SGD, assert_matches_torch, labels, train_both
from pock_tvm.models import MLP, MobileNetV2, ResNet18

PARTIAL = {
    "mlp": pock_tvm.Scheme("partial", rules=[pock_tvm.Rule("fc2.weight", "partial", 0.25),
                                             pock_tvm.Rule("fc3", "full")]),
    "mobilenetv2": "tte-mbv2",
    "resnet18": pock_tvm.Scheme("partial", bias="all", rules=[
        pock_tvm.Rule("layer4.1.conv2.weight", "partial", 0.25), pock_tvm.Rule("fc", "full")]),
}
SCHEMES = ["full", "bias-only", "last-2", "partial"]


def _case(name):
    if name == "mlp":
        return MLP(), (torch.randn(4, 32),), labels(4)
    if name == "mobilenetv2":
        return MobileNetV2(width_mult=0.35, num_classes=10), (torch.randn(2, 3, 128, 128),), labels(2)
    return ResNet18(num_classes=10, width=16), (torch.randn(2, 3, 32, 32),), labels(2)


def _check(name, scheme, optimizer, update_tol=1e-3):
    model, inputs, target = _case(name)
    scheme = PARTIAL[name] if scheme == "partial" else scheme
    program = pock_tvm.compile(model, inputs, scheme=scheme, optimizer=optimizer)
    losses = assert_matches_torch(model, program, optimizer, inputs, target, update_tol=update_tol,
                                  kink_flips=0 if name == "mlp" else KINK_FLIPS)
    assert losses[-1] < losses[0], "three steps on one batch must lower its loss"


@pytest.mark.parametrize("scheme,optimizer", [(s, SGD) for s in SCHEMES] + [("full", ADAM), ("partial", ADAM)] + [
    pytest.param(s, ADAM, marks=pytest.mark.slow) for s in ("bias-only", "last-2")],
    ids=[f"sgd-{s}" for s in SCHEMES] + ["adam-full", "adam-partial", "adam-bias-only", "adam-last-2"])
def test_mlp(scheme, optimizer):
    _check("mlp", scheme, optimizer)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", ["mobilenetv2", "resnet18"])
def test_deep_sgd(name, scheme):
    _check(name, scheme, SGD)


@pytest.mark.slow
@pytest.mark.parametrize("name,scheme", [("mobilenetv2", "bias-only"), ("mobilenetv2", "partial"),
                                         ("resnet18", "full"), ("resnet18", "last-2")])
def test_deep_adam(name, scheme):
    # Adam's first steps move each element by ~lr*sign(g): where kink flips perturb a tiny
    # gradient (see helpers.ADAM_DEEP) the update moves by up to ~1% of the largest one.
    _check(name, scheme, ADAM_DEEP, update_tol=1e-2)


def test_adamw_and_nesterov_match_torch():
    for optimizer in (pock_tvm.AdamW(lr=1e-2), pock_tvm.SGD(lr=0.1, momentum=0.9, nesterov=True),
                      pock_tvm.SGD(lr=0.1, momentum=0.5, dampening=0.1)):
        model, inputs, target = _case("mlp")
        program = pock_tvm.compile(model, inputs, scheme="full", optimizer=optimizer)
        assert_matches_torch(model, program, optimizer, inputs, target)


def test_mse_and_torch_loss_match_torch():
    model, inputs, _ = _case("mlp")
    target = torch.randn(4, 10)
    program = pock_tvm.compile(model, inputs, scheme="last-1", loss="mse", optimizer=SGD)
    _, after, expected, ours, theirs = train_both(model, program, SGD, inputs, target,
                                                  loss_fn=torch.nn.functional.mse_loss)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-6)
    smooth = torch.nn.SmoothL1Loss()
    program = pock_tvm.compile(model, inputs, scheme="last-1", optimizer=SGD,
                               loss=pock_tvm.TorchLoss(smooth, target))
    _, after, expected, ours, theirs = train_both(model, program, SGD, inputs, target, loss_fn=smooth)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-6)
    for name in after:
        torch.testing.assert_close(torch.tensor(after[name]), torch.tensor(expected[name]), rtol=1e-4, atol=1e-7)


class _Bag(torch.nn.Module):
    """An embedding bag classifier: integer token inputs, a gradient only for the rows seen."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, tokens):
        return self.fc(self.embed(tokens).mean(1))


def test_embedding_with_integer_inputs_matches_torch():
    tokens = torch.randint(0, 20, (2, 5))
    tokens[1, :3] = 7  # a row seen several times accumulates its gradients
    model, plain = _Bag(), pock_tvm.SGD(lr=0.05)  # no weight decay: unseen rows must not move
    program = pock_tvm.compile(model, (tokens,), scheme="full", optimizer=plain)
    assert program.layout.inputs[0].dtype == "int64"
    assert_matches_torch(model, program, plain, (tokens,), labels(2))
    unseen = [r for r in range(20) if r not in set(tokens.flatten().tolist())]
    assert (program.state_dict()["embed.weight"][unseen] == model.embed.weight.detach().numpy()[unseen]).all()


class _NormGelu(torch.nn.Module):
    """The transformer MLP pieces: LayerNorm (weight and bias trained) and both GELU forms."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm1 = torch.nn.Linear(16, 32), torch.nn.LayerNorm(32)
        self.fc2, self.norm2 = torch.nn.Linear(32, 32), torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = torch.nn.functional.gelu(self.norm1(self.fc1(x)))
        x = torch.nn.functional.gelu(self.norm2(self.fc2(x)), approximate="tanh")
        return self.head(x)


@pytest.mark.parametrize("scheme", ["full", "bias-only"])
def test_layer_norm_and_gelu_match_torch(scheme):
    model = _NormGelu()
    x = torch.randn(4, 16)
    program = pock_tvm.compile(model, (x,), scheme=scheme if scheme == "full" else pock_tvm.Scheme(
        "norms", bias="all", norm_affine=True), optimizer=ADAM)
    trained = {p.source for p in program.layout.params if p.trainable}
    assert {"norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"} <= trained  # norms count as norms
    assert_matches_torch(model, program, ADAM, (x,), labels(4))
