import shutil

import pytest

from pock_tvm.targets.runner_build import build_runner

CROSS_TOOLS = ("aarch64-linux-gnu-g++", "qemu-aarch64-static", "cmake")
missing = [t for t in CROSS_TOOLS if shutil.which(t) is None]
needs_cross_tools = pytest.mark.skipif(
    bool(missing), reason=f"needs {missing} (`make test` installs them when run as root)")


@pytest.fixture(scope="session")
def rpi4_runner(tmp_path_factory):
    return build_runner("rpi4", tmp_path_factory.mktemp("runner") / "rpi4")


@pytest.fixture(scope="session")
def host_runner(tmp_path_factory):
    return build_runner("host", tmp_path_factory.mktemp("runner") / "host")
