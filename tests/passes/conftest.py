import pytest
import torch

from pock_tvm.frontend import from_torch
from pock_tvm.models import SmallCNN


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    return from_torch(SmallCNN(), torch.randn(2, 3, 16, 16))
