"""Deployment targets as data: what TVM generates code for, and how the result is linked.

A preset names its TVM target (dict form; CUDA presets carry their CPU host), the machine the
bundle runs on (``arch``/``os``, checked by the device runner), the cross compiler or linker that
turns TVM's object files into a shared library, and the ``apache-tvm`` wheel platform whose
runtime libraries the C++ runner links. Users add their own from a ``.toml``/``.json`` file with
the same fields (``load_target``).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..runtime.host import host_arch


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    tvm_target: dict  # {"kind": "llvm", ...}; CUDA: {"kind": "cuda", "arch": "sm_87", "host": {...}}
    arch: str  # machine the bundle runs on: x86_64 | aarch64 | arm64
    os: str  # linux | macos
    device: str = "cpu"  # cpu | cuda
    cross_compiler: str | None = None  # C++ compiler that links the .so (None: the host's)
    linker: str | None = None  # Mach-O: ld64.lld links the .dylib without a macOS SDK
    export_format: str = "so"  # so | dylib
    runtime_platform: str | None = None  # apache-tvm wheel platform with this target's runtime
    cmake_toolchain: str | None = None  # runner/cmake/<file> for cross-building the runner
    cuda_arch: str | None = None  # sm_XX for CUDA presets ("auto": the local GPU)
    conv_layout: str = "NCHW"  # what convs compile in: a key of CONV_LAYOUTS (benchmarks/bench_layouts.py)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.conv_layout not in CONV_LAYOUTS:
            raise ValueError(f"target '{self.name}': conv_layout {self.conv_layout!r} is not one of "
                             f"{', '.join(CONV_LAYOUTS)}")

    @property
    def library_name(self) -> str:
        return f"lib.{self.export_format}"

    @property
    def is_cross(self) -> bool:
        return (self.arch, self.os) != (host_arch(), "linux")

    def to_json(self) -> dict:
        return asdict(self)


# conv layouts a target can compile in: Relax ConvertLayout's desired layouts (data, weights) for
# conv2d, or None for the layout the frontends import (NCHW, OIHW). Measured on the x86 host with
# the default schedules: NHWC is 1.1-1.9x slower per training step (benchmarks/results/layouts_host.md),
# so every preset keeps NCHW.
CONV_LAYOUTS: dict[str, dict | None] = {
    "NCHW": None,
    "NHWC": {"relax.nn.conv2d": ["NHWC", "HWIO"]},
}


def _aarch64(mcpu: str, mattr: list[str] | None = None) -> dict:
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu, "mattr": mattr or ["+neon"]}


_LINUX_ARM = {"arch": "aarch64", "os": "linux", "cross_compiler": "aarch64-linux-gnu-g++",
              "runtime_platform": "manylinux_2_28_aarch64", "cmake_toolchain": "aarch64-linux-gnu.cmake"}

PRESETS: dict[str, TargetPreset] = {p.name: p for p in [
    TargetPreset("host", "this machine's CPU (LLVM, no cross compiler)", {"kind": "llvm", "mcpu": "native"},
                 host_arch(), "linux"),
    TargetPreset("rpi4", "Raspberry Pi 4: Cortex-A72, aarch64 Linux, NEON",
                 _aarch64("cortex-a72"), **_LINUX_ARM),
    TargetPreset("rpi5", "Raspberry Pi 5: Cortex-A76, aarch64 Linux, NEON + dot product",
                 _aarch64("cortex-a76", ["+neon", "+dotprod"]), **_LINUX_ARM),
    TargetPreset("apple-m1", "Apple M1, arm64 macOS (a .dylib linked with ld64.lld, no SDK)",
                 {"kind": "llvm", "mtriple": "arm64-apple-macos", "mcpu": "apple-m1"}, "arm64", "macos",
                 linker="ld64.lld", export_format="dylib", runtime_platform="macosx_11_0_arm64"),
    TargetPreset("jetson-orin", "NVIDIA Jetson Orin: CUDA sm_87, Cortex-A78AE aarch64 host",
                 {"kind": "cuda", "arch": "sm_87", "host": _aarch64("cortex-a78")}, device="cuda",
                 cuda_arch="sm_87", **_LINUX_ARM),
    TargetPreset("jetson-nano", "NVIDIA Jetson Nano: CUDA sm_53, Cortex-A57 aarch64 host",
                 {"kind": "cuda", "arch": "sm_53", "host": _aarch64("cortex-a57")}, device="cuda",
                 cuda_arch="sm_53", **_LINUX_ARM),
    TargetPreset("cuda", "the local NVIDIA GPU (architecture read from the driver), x86_64 host",
                 {"kind": "cuda", "arch": "auto", "host": {"kind": "llvm", "mcpu": "native"}}, host_arch(), "linux",
                 device="cuda", cuda_arch="auto"),
]}


def load_target(target: str | TargetPreset) -> TargetPreset:
    """A preset by name, or one defined in a ``.toml``/``.json`` file with the fields above."""
    if isinstance(target, TargetPreset):
        return target
    if target in PRESETS:
        return PRESETS[target]
    path = Path(target)
    if path.suffix in (".toml", ".json"):
        if not path.exists():
            raise ValueError(f"target file '{path}' does not exist")
        data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        data = data.get("target", data)
        known = {f.name for f in fields(TargetPreset)}
        unknown = sorted(set(data) - known)
        required = ["name", "description", "tvm_target", "arch", "os"]
        missing = [k for k in required if k not in data]
        if unknown or missing:
            raise ValueError(f"target file '{path}': unknown fields {unknown}, missing fields {missing} "
                             f"(fields: {sorted(known)})")
        return TargetPreset(**data)
    raise ValueError(f"unknown target {target!r}; presets: {', '.join(PRESETS)}, or a .toml/.json file "
                     "with the fields of pock_tvm.targets.TargetPreset")
