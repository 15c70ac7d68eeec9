"""CheckGradientRules: an op without a gradient rule is named with its source node."""

import pytest
import torch
from torch import nn

import pock_tvm


class GeluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_missing_rule_names_op_and_torch_node():
    with pytest.raises(ValueError) as err:
        pock_tvm.compile(GeluNet(), (torch.randn(2, 8),), scheme="full")
    message = str(err.value)
    assert "relax.nn.gelu" in message
    assert "torch node 'gelu'" in message and "module 'act' (GELU)" in message
    assert "GRADIENT_RULES" in message  # says how to fix it


def test_op_above_the_updated_layers_only_is_fine():
    # only fc2 is updated: gelu sits below it, so no rule is needed
    program = pock_tvm.compile(GeluNet(), (torch.randn(2, 8),), scheme="last-1")
    assert program.step(torch.randn(2, 8).numpy(), torch.tensor([0, 2]).numpy()) > 0
