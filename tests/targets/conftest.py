import pytest

from pock_tvm.targets.runner_build import build_runner


@pytest.fixture(scope="session")
def rpi4_runner(tmp_path_factory):
    return build_runner("rpi4", tmp_path_factory.mktemp("runner") / "rpi4")

