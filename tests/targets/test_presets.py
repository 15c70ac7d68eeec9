"""Target presets are data: each one's fields are pinned; user files load; bad names are explained."""

import json

import pytest

from pock_tvm.targets import PRESETS, load_target
from pock_tvm.targets.presets import host_arch

AARCH64 = {"arch": "aarch64", "os": "linux", "cross_compiler": "aarch64-linux-gnu-g++", "export_format": "so",
           "runtime_platform": "manylinux_2_28_aarch64", "cmake_toolchain": "aarch64-linux-gnu.cmake"}
EXPECTED = {
    "host": ({"kind": "llvm", "mcpu": "native"}, {"arch": host_arch(), "os": "linux", "device": "cpu", "cross_compiler": None}),
    "rpi4": ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]},
             {**AARCH64, "device": "cpu"}),
    "rpi5": ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"]},
             {**AARCH64, "device": "cpu"}),
    "apple-m1": ({"kind": "llvm", "mtriple": "arm64-apple-macos", "mcpu": "apple-m1"},
                 {"arch": "arm64", "os": "macos", "linker": "ld64.lld", "export_format": "dylib",
                  "runtime_platform": "macosx_11_0_arm64"}),
    "jetson-orin": ({"kind": "cuda", "arch": "sm_87", "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                                               "mcpu": "cortex-a78", "mattr": ["+neon"]}},
                    {**AARCH64, "device": "cuda", "cuda_arch": "sm_87"}),
    "jetson-nano": ({"kind": "cuda", "arch": "sm_53", "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                                               "mcpu": "cortex-a57", "mattr": ["+neon"]}},
                    {**AARCH64, "device": "cuda", "cuda_arch": "sm_53"}),
    "cuda": ({"kind": "cuda", "arch": "auto", "host": {"kind": "llvm", "mcpu": "native"}},
             {"arch": host_arch(), "device": "cuda", "cuda_arch": "auto"}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_fields_are_pinned(name):
    tvm_target, fields = EXPECTED[name]
    preset = PRESETS[name]
    assert preset.tvm_target == tvm_target
    for key, value in {"conv_layout": "NCHW", **fields}.items():  # NHWC measured slower (bench_layouts.py)
        assert getattr(preset, key) == value, key
    assert set(PRESETS) == set(EXPECTED)


def test_native_cpu_is_the_detected_one():
    """The detected CPU, or for one LLVM's tuning miscompiles (GENERIC_TUNING) the generic CPU of
    its ISA level with its features."""
    from pock_tvm.targets.toolchain import GENERIC_TUNING, system_cpu, tvm_target

    target = tvm_target(PRESETS["host"]).export()
    assert system_cpu() not in ("", "native", "generic")
    assert target["mcpu"] == GENERIC_TUNING.get(system_cpu(), system_cpu())


def test_user_target_file(tmp_path):
    path = tmp_path / "pi-zero2.toml"
    path.write_text('[target]\nname = "pi-zero2"\ndescription = "Cortex-A53"\narch = "aarch64"\nos = "linux"\n'
                    'cross_compiler = "aarch64-linux-gnu-g++"\nruntime_platform = "manylinux_2_28_aarch64"\n'
                    'cmake_toolchain = "aarch64-linux-gnu.cmake"\n'
                    '[target.tvm_target]\nkind = "llvm"\nmtriple = "aarch64-linux-gnu"\nmcpu = "cortex-a53"\n')
    preset = load_target(str(path))
    assert (preset.name, preset.tvm_target["mcpu"], preset.is_cross) == ("pi-zero2", "cortex-a53", host_arch() != "aarch64")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "cpu": "a53"}))
    with pytest.raises(ValueError, match=r"unknown fields \['cpu'\], missing fields \['description', 'tvm_target'"):
        load_target(str(bad))


def test_unknown_conv_layout_names_the_choices(tmp_path):
    path = tmp_path / "nchwc.json"
    path.write_text(json.dumps({"name": "x", "description": "d", "tvm_target": {"kind": "llvm"}, "arch": "x86_64",
                                "os": "linux", "conv_layout": "NCHW8c"}))
    with pytest.raises(ValueError, match=r"target 'x': conv_layout 'NCHW8c' is not one of NCHW, NHWC"):
        load_target(str(path))


def test_unknown_target_lists_presets():
    with pytest.raises(ValueError, match=r"unknown target 'rpi3'; presets: host, rpi4, rpi5, apple-m1"):
        load_target("rpi3")


def test_one_runner_build_at_a_time_per_build_directory(tmp_path):
    """A second build of the same target waits for the first (they shared one cmake build directory
    and installed into each other's output when they overlapped)."""
    import shutil
    import threading
    import time

    from pock_tvm.targets.runner_build import ROOT, build_runner, building

    if shutil.which("cmake") is None:
        pytest.skip("cmake is missing (make tools installs it)")

    done = []
    with building(ROOT / "build" / "runner-host"):  # another process's build, in effect
        worker = threading.Thread(target=lambda: done.append(build_runner("host", out=tmp_path / "runner")))
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive() and not done  # waiting, not building beside it
    worker.join(timeout=300)
    assert done and (done[0] / "pock_runner").is_file()
