"""Build-side tools of a target preset: its TVM target, and how its library is linked."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import tvm

from .presets import TargetPreset

logger = logging.getLogger(__name__)


def tvm_target(preset: TargetPreset) -> tvm.target.Target:
    """The preset's TVM target. ``"mcpu": "native"`` (host presets) is the CPU LLVM detects here:
    without an ``mcpu`` LLVM generates for the baseline ISA (SSE2 on x86_64: no AVX, no FMA), which
    makes every kernel several times slower. ``"arch": "auto"`` (CUDA) is read from the local GPU."""
    spec = _native(dict(preset.tvm_target))
    if spec.get("arch") == "auto":
        dev = tvm.cuda()
        if not dev.exist:
            raise ValueError(f"target {preset.name!r} reads the architecture of the local GPU, and "
                             "this machine has none; use a preset with a fixed architecture "
                             "(jetson-orin, jetson-nano) or a target file with cuda_arch set")
        spec["arch"] = "sm_" + dev.compute_version.replace(".", "")
    return tvm.target.Target(spec)


def system_cpu() -> str:
    """The CPU LLVM detects on this machine (``znver4``, ``cortex-a72``, ...)."""
    return str(tvm.get_global_func("target.llvm_get_system_cpu")())


def system_cpu_features() -> set[str]:
    """The ISA features (LLVM's names: ``avx512f``, ``neon``, ...) of the CPU LLVM detects here."""
    return cpu_features(system_cpu())


def cpu_features(cpu: str) -> set[str]:
    """The features LLVM gives the CPU named ``cpu`` (``znver5``, ``cortex-a72``)."""
    from tvm.target import codegen

    return {str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": cpu}))}


# LLVM CPUs whose tuning miscompiles kernels of the pock_tvm pipeline, and the generic CPU of the
# same ISA level to tune for instead (the CPU's own features are kept, as ``mattr``). Found: on
# znver4/znver5 (AMD Zen 4/5) an inlined pad chain (the gradient of a rotary embedding's
# rotate-half) computed wrong values, wrong gradients; the same kernel is right for x86-64-v4 with
# every znver5 feature (tests/targets/test_host_target.py).
GENERIC_TUNING = {"znver4": "x86-64-v4", "znver5": "x86-64-v4"}


def native_cpu(cpu: str | None = None) -> dict:
    """``{"mcpu": ...}`` (and ``"mattr"``) to compile for ``cpu`` (default: this machine's):
    the CPU itself, or for one of :data:`GENERIC_TUNING` the generic CPU with its features."""
    cpu = cpu or system_cpu()
    if cpu not in GENERIC_TUNING:
        return {"mcpu": cpu}
    return {"mcpu": GENERIC_TUNING[cpu], "mattr": sorted(f"+{f}" for f in cpu_features(cpu))}


def _native(spec: dict) -> dict:
    if spec.get("mcpu") == "native":
        native = native_cpu()
        spec["mcpu"] = native["mcpu"]
        if "mattr" in native:
            spec["mattr"] = sorted(set(spec.get("mattr", [])) | set(native["mattr"]))
    if isinstance(spec.get("host"), dict):
        spec["host"] = _native(dict(spec["host"]))
    return spec


def require_tool(tool: str, package: str) -> str:
    path = shutil.which(tool) or next(
        (str(p) for p in sorted(Path("/usr/bin").glob(f"{tool}-*")) + sorted(Path("/usr/lib").glob(f"llvm-*/bin/{tool}"))),
        None)
    if path is None:
        raise ValueError(f"{tool} is not installed; it links libraries for this target "
                         f"(Debian: apt-get install {package})")
    return path


def exporter(preset: TargetPreset) -> Callable[[object, Path], None]:
    """``(executable, file) -> None`` writing the preset's shared library."""
    if preset.export_format == "dylib":
        return _export_dylib
    if preset.cross_compiler:
        cc = preset.cross_compiler

        def export(exe, file: Path) -> None:
            require_tool(cc, "g++-aarch64-linux-gnu" if "aarch64" in cc else cc)
            exe.export_library(str(file), cc=cc)

        return export
    return lambda exe, file: exe.export_library(str(file))


def _export_dylib(exe, file: Path) -> None:
    """Mach-O objects from TVM (a ``.tar`` export), linked by ``ld64.lld`` into an arm64 dylib.

    No macOS SDK is needed: undefined symbols (libm, the TVM runtime) bind when the runner that
    links the runtime loads the library (``-undefined dynamic_lookup``)."""
    lld = require_tool("ld64.lld", "lld")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "lib.tar"
        exe.export_library(str(archive))
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        objects = sorted(str(p) for p in Path(tmp).glob("*.o"))
        cmd = [lld, "-arch", "arm64", "-platform_version", "macos", "11.0", "11.0", "-dylib",
               "-undefined", "dynamic_lookup", "-install_name", "@rpath/lib.dylib", "-o", str(file), *objects]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ValueError(f"ld64.lld failed to link {file.name}: {result.stderr.strip()[:500]}")


@contextlib.contextmanager
def cuda_build_env(preset: TargetPreset):
    """Ahead-of-time CUDA: kernels go through ``nvcc`` to a fatbin with the preset's ``sm_XX``
    cubin, so no GPU is needed to build. TVM's CUDA runtime library must load for that; where the
    machine has no driver, a stub ``libcuda.so.1`` stands in (it is never called)."""
    if preset.device != "cuda":
        yield
        return
    require_tool("nvcc", "the CUDA toolkit (nvcc)")
    _ensure_libcuda()
    import tvm.support.nvcc  # noqa: F401  registers tvm_callback_cuda_compile: codegen calls nvcc
    old = os.environ.get("TVM_CUDA_COMPILE_MODE")
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TVM_CUDA_COMPILE_MODE", None)
        else:
            os.environ["TVM_CUDA_COMPILE_MODE"] = old


def _ensure_libcuda() -> None:
    """Load TVM's CUDA runtime library (codegen only emits binaries when it is loaded), with a
    stub driver where there is no real one."""
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        _load_stub_driver()
    cuda_runtime = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if cuda_runtime.exists():
        ctypes.CDLL(str(cuda_runtime), mode=ctypes.RTLD_GLOBAL)


def _load_stub_driver() -> None:
    """A ``libcuda.so.1`` whose driver functions (those TVM's CUDA runtime imports) all return
    CUDA_ERROR_NO_DEVICE. It lets the runtime load for ahead-of-time builds; it is never shipped."""
    cuda_runtime = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    stub_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pock_tvm" / "cuda-stub"
    stub = stub_dir / "libcuda.so.1"
    if not stub.exists():
        stub_dir.mkdir(parents=True, exist_ok=True)
        nm = subprocess.run(["nm", "-D", "--undefined-only", str(cuda_runtime)], capture_output=True,
                            text=True, check=True).stdout
        names = sorted({line.split()[-1] for line in nm.splitlines()
                        if line.split()[-1][:2] == "cu" and line.split()[-1][2:3].isupper()})
        src = stub_dir / "stub.c"
        src.write_text("/* build-time stand-in for the CUDA driver: every call reports no device */\n"
                       + "".join(f"int {n}(void) {{ return 100; }}\n" for n in names))
        cc = shutil.which("cc") or shutil.which("gcc")
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stub), str(src)],
                       check=True, capture_output=True)
    ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
    logger.info("no CUDA driver here: a stub libcuda.so.1 lets TVM build CUDA kernels ahead of time")


def cuda_info(target: tvm.target.Target) -> dict:
    """What the bundle's kernels need on the device: architecture and the toolkit that built them."""
    out = subprocess.run([require_tool("nvcc", "the CUDA toolkit")] + ["--version"], capture_output=True,
                         text=True).stdout
    release = next((line.split("release")[1].split(",")[0].strip() for line in out.splitlines()
                    if "release" in line), "unknown")
    return {"arch": str(target.arch), "nvcc_release": release}
