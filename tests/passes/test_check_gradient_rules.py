"""CheckGradientRules: an op without a gradient rule is named with its source node."""

import pytest
import torch
from torch import nn

import pock_tvm


class Atan(nn.Module):
    def forward(self, x):
        return torch.atan(x)


class AtanNet(nn.Module):  # relax.atan has no gradient rule
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.act = Atan()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_missing_rule_names_op_and_torch_node():
    with pytest.raises(ValueError) as err:
        pock_tvm.compile(AtanNet(), (torch.randn(2, 8),), scheme="full")
    message = str(err.value)
    assert "relax.atan" in message
    assert "torch node 'atan'" in message and "module 'act' (Atan)" in message
    assert "GRADIENT_RULES" in message  # says how to fix it


def test_op_above_the_updated_layers_only_is_fine():
    # only fc2 is updated: atan sits below it, so no rule is needed
    program = pock_tvm.compile(AtanNet(), (torch.randn(2, 8),), scheme="last-1")
    assert program.step(torch.randn(2, 8).numpy(), torch.tensor([0, 2]).numpy()) > 0


class AtanLoss(nn.Module):  # a torch loss with an op that has no gradient rule
    def forward(self, prediction, target):
        return torch.atan(prediction - target).pow(2).mean()


def test_an_op_of_a_torch_loss_without_a_rule_is_named_too():
    from pock_tvm.loss import TorchLoss

    with pytest.raises(ValueError) as err:
        pock_tvm.compile(nn.Linear(8, 3), (torch.randn(2, 8),), scheme="full",
                         loss=TorchLoss(AtanLoss(), torch.zeros(2, 3)))
    message = str(err.value)
    assert "relax.atan" in message and "from the loss function" in message and "GRADIENT_RULES" in message
