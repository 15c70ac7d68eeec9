"""Build the C++ device runner for a target: TVM runtime from the matching wheel, CMake, copy out.

The runtime libraries of a target come from the ``apache-tvm`` and ``apache-tvm-ffi`` wheels of
its ``runtime_platform`` (``pip download``, cached under ``~/.cache/pock_tvm/runtime``); for the
host they are the installed ones. The result is a directory with ``pock_runner`` and the
libraries beside it, ready to copy to the board.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

from ..cache import cache_dir
from .presets import TargetPreset, load_target
from .toolchain import require_tool

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]  # the source checkout (CMakeLists.txt, runner/)
LIBS = ("libtvm_runtime", "libtvm_ffi")


def runtime_dir(preset: TargetPreset) -> Path:
    """``<dir>/lib`` with the target's TVM runtime libraries, ``<dir>/include`` with tvm_ffi headers."""
    import tvm
    import tvm_ffi

    if not preset.is_cross:
        out = cache_dir() / "runtime" / f"host-{version('apache-tvm')}"
        sources = {"lib": [Path(tvm.__file__).parent / "lib", Path(tvm_ffi.__file__).parent / "lib"]}
        _assemble(out, sources, Path(tvm_ffi.__file__).parent / "include", preset.device == "cuda")
        return out
    if not preset.runtime_platform:
        raise ValueError(f"target {preset.name!r} names no runtime_platform (an apache-tvm wheel platform "
                         "tag) to take the device's TVM runtime from")
    out = cache_dir() / "runtime" / f"{preset.runtime_platform}-{version('apache-tvm')}"
    if (out / "lib").exists() and (out / "include").exists():
        return out
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform",
           preset.runtime_platform, "--python-version", "3.11", "-d", str(wheels),
           f"apache-tvm=={version('apache-tvm')}", f"apache-tvm-ffi=={version('apache-tvm-ffi')}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"could not download the {preset.runtime_platform} TVM runtime wheels: "
                         f"{result.stderr.strip()[-400:]}")
    extracted = out / "wheel"
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(extracted)
    _assemble(out, {"lib": [extracted / "tvm" / "lib", extracted / "tvm_ffi" / "lib"]},
              Path(tvm_ffi.__file__).parent / "include", preset.device == "cuda")
    return out


def _assemble(out: Path, sources: dict, include: Path, cuda: bool) -> None:
    lib = out / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    names = LIBS + (("libtvm_runtime_cuda",) if cuda else ())
    for name in names:
        found = [f for d in sources["lib"] for f in d.glob(f"{name}.*") if f.suffix in (".so", ".dylib")]
        if not found:
            raise ValueError(f"{name} is not in {[str(d) for d in sources['lib']]}")
        shutil.copy2(found[0], lib / found[0].name)
    if not (out / "include").exists():
        shutil.copytree(include, out / "include")


@contextlib.contextmanager
def building(build: Path):
    """One process at a time configures, builds and installs from the build directory ``build``
    (a blocking ``flock`` beside it): two builds of one target with other install directories or
    runtimes reconfigured it under each other and installed into each other's directory."""
    build.parent.mkdir(parents=True, exist_ok=True)
    with open(build.parent / f".{build.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_runner(target: str | TargetPreset = "host", out: str | Path | None = None) -> Path:
    """Configure and build ``pock_runner`` for ``target``; returns the directory holding it and
    the runtime libraries it loads (copy that directory to the device)."""
    preset = load_target(target)
    if preset.os != "linux":
        raise ValueError(f"build-runner cross-builds Linux runners only; on the {preset.name} machine "
                         "itself run: cmake -S . -B build/runner -DPOCK_TVM_RUNTIME_DIR=<dir> && "
                         "cmake --build build/runner (see README, Deploying to a board)")
    if not (ROOT / "CMakeLists.txt").exists():
        raise ValueError(f"the runner sources are not beside the package ({ROOT}); build from a source checkout")
    cmake = require_tool("cmake", "cmake")
    runtime = runtime_dir(preset)
    build = ROOT / "build" / f"runner-{preset.name}"
    out = Path(out) if out else ROOT / "dist" / f"runner-{preset.name}"
    args = [cmake, "-S", str(ROOT), "-B", str(build), f"-DPOCK_TVM_RUNTIME_DIR={runtime}",
            f"-DCMAKE_INSTALL_PREFIX={out.resolve()}"]
    if preset.is_cross:
        if not preset.cmake_toolchain:
            raise ValueError(f"target {preset.name!r} names no cmake_toolchain to cross-build the runner")
        require_tool(preset.cross_compiler or "", "g++-aarch64-linux-gnu")
        args.append(f"-DCMAKE_TOOLCHAIN_FILE={ROOT / 'runner' / 'cmake' / preset.cmake_toolchain}")
    with building(build):
        for cmd in (args, [cmake, "--build", str(build), "-j", str(os.cpu_count() or 2)],
                    [cmake, "--install", str(build)]):
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise ValueError(f"building the runner failed ({' '.join(cmd[:2])}): "
                                 f"{(result.stderr or result.stdout).strip()[-800:]}")
        if preset.device == "cuda":
            for f in (runtime / "lib").glob("libtvm_runtime_cuda.*"):
                shutil.copy2(f, out / f.name)
    logger.info("built %s", out / "pock_runner")
    return out
