"""Cross-compiled bundles: an arm64 Mach-O dylib for M1, sm_87 cubin with an aarch64 host for Jetson."""

import shutil
import subprocess

import pytest
import torch

import pock_tvm
from pock_tvm.models import MLP
from pock_tvm.runtime.bundle import read_manifest
from pock_tvm.targets.inspect import cubin_archs, library_kind
from pock_tvm.targets.toolchain import require_tool
from helpers import tiny_llama


def _bundle(target, path):
    torch.manual_seed(0)
    program = pock_tvm.compile(MLP(), (torch.randn(4, 32),), scheme="last-2", target=target)
    with pytest.raises(ValueError, match=rf"compiled for {target} .*run the bundle there"):
        program.step(torch.randn(4, 32).numpy(), torch.zeros(4, dtype=torch.int64).numpy())
    return program.save(path)


def _has(tool):
    try:
        require_tool(tool, "")
        return True
    except ValueError:
        return False


@pytest.mark.skipif(not _has("ld64.lld") or shutil.which("llvm-nm") is None, reason="needs lld and llvm-nm")
def test_apple_m1_bundle_is_an_arm64_dylib_with_the_step(tmp_path):
    path = _bundle("apple-m1", tmp_path / "m1")
    manifest = read_manifest(path)
    assert manifest["library"] == "lib.dylib" and manifest["target"]["os"] == "macos"
    assert library_kind(path / "lib.dylib") == {"format": "mach-o", "machine": "arm64", "filetype": "dylib"}
    symbols = subprocess.run(["llvm-nm", "--extern-only", "--defined-only", str(path / "lib.dylib")],
                             capture_output=True, text=True, check=True).stdout
    assert "___tvm_ffi__library_bin" in symbols  # the packed Relax VM executable
    assert sum("___tvm_ffi_" in line for line in symbols.splitlines()) > 10  # the kernels


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_jetson_orin_bundle_holds_sm87_cubin_for_an_aarch64_host(tmp_path):
    path = _bundle("jetson-orin", tmp_path / "orin")
    manifest = read_manifest(path)
    assert manifest["target"]["device"] == "cuda" and manifest["cuda"]["arch"] == "sm_87"
    assert manifest["cuda"]["nvcc_release"]  # the toolkit that built the cubin, for the device's driver
    assert library_kind(path / "lib.so") == {"format": "elf", "machine": "aarch64"}
    archs = cubin_archs(path / "lib.so")
    assert archs and set(archs) == {"sm_87"}
    assert b"__global__" not in (path / "lib.so").read_bytes()  # binary kernels, not CUDA source


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_jetson_orin_bundle_of_a_causal_lm_step(tmp_path):
    """A tiny Llama with LoRA and the next-token loss: every kernel gets a GPU schedule and sm_87 cubin."""
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8))
    program = pock_tvm.compile(tiny_llama(num_hidden_layers=1), (ids, torch.ones_like(ids)), scheme="lora",
                               loss="next_token", target="jetson-orin")
    path = program.save(tmp_path / "orin-lm")
    assert read_manifest(path)["layout"]["inputs"][0]["bound"] == 64
    assert set(cubin_archs(path / "lib.so")) == {"sm_87"}
