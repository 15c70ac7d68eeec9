import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# Tests compile fresh: no user's compile cache read or filled (tests/test_cache.py switches it on
# in a cache of its own). Set here, before pock_tvm is imported, so subprocesses inherit it too.
os.environ["POCK_TVM_COMPILE_CACHE"] = "0"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def pytest_addoption(parser):
    parser.addoption("--fuzz-seed", type=int, default=0,
                     help="seed of the kernel schedule fuzz tests (tests/passes/test_schedule_fuzz.py); CI uses 0")
    parser.addoption("--fuzz-cases", type=int, default=None,
                     help="random cases per op kind in the kernel schedule fuzz tests (default: the CI slice)")


@pytest.fixture(scope="session")
def host_runner(tmp_path_factory):
    """``pock_runner`` built for this machine (tests/targets, tests/fleet)."""
    from pock_tvm.targets.runner_build import build_runner

    return build_runner("host", tmp_path_factory.mktemp("runner") / "host")
