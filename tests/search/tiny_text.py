"""Token data for the transformer search tests: sequences with something to learn, their shape
and the analysis settings (the fixtures are in this folder's conftest)."""

import numpy as np

import pock_tvm
from pock_tvm.search import AnalysisSettings

SEQ, BATCH = 12, 2
SETTINGS = AnalysisSettings(epochs=2, loss="next_token", optimizer=pock_tvm.Adam(lr=1e-2), lora_ranks=(4,))


def tokens(n=20, seed=0):
    """Sequences where every odd token is the previous one plus 1: something to learn."""
    ids = np.random.default_rng(seed).integers(0, 64, (n, SEQ)).astype("int64")
    ids[:, 1::2] = (ids[:, 0::2] + 1) % 64
    return (ids, np.ones_like(ids)), ids.copy()
