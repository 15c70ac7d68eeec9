"""Shared by the transformer search tests: a tiny Llama, token data with something to learn, and
one analysis of it (session-wide: it is the slow part)."""

import pytest
import torch

from pock_tvm.frontend import from_torch
from pock_tvm.search import analyze

from helpers import tiny_llama

from tiny_text import BATCH, SEQ, SETTINGS, tokens


@pytest.fixture(scope="session")
def llama():
    torch.manual_seed(0)
    return from_torch(tiny_llama(), (torch.zeros(BATCH, SEQ, dtype=torch.int64),
                                     torch.ones(BATCH, SEQ, dtype=torch.int64)))


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def analysis(llama, cache):
    return analyze(llama, *tokens(), batch=BATCH, settings=SETTINGS, cache_dir=cache)


