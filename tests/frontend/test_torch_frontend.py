"""The torch import: what a module's own definition says about training is kept."""

import numpy as np
import torch

import pock_tvm
from helpers import assert_matches_torch

SGD = pock_tvm.SGD(lr=0.05, momentum=0.9)  # no weight decay: a row without gradient stays as it is


class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(12, 8, padding_idx=0)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


def test_an_embeddings_padding_row_gets_no_gradient_as_in_torch():
    torch.manual_seed(0)
    model = Tagger().eval()
    with torch.no_grad():
        model.embed.weight[0] = 0.3  # a padding row that is not zero: still never trained
    ids = torch.tensor([[0, 3, 3, 5], [1, 0, 0, 7]])
    program = pock_tvm.compile(model, (ids,), scheme="full", optimizer=SGD)
    before = program.state_dict()["embed.weight"][0].copy()
    assert_matches_torch(model, program, SGD, (ids,), torch.tensor([1, 4]))
    np.testing.assert_array_equal(program.state_dict()["embed.weight"][0], before)
