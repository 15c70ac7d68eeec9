"""pock-tvm compile / info / train, and the errors they print."""

import numpy as np
import pytest

import torch

import pock_tvm
from pock_tvm.cli.main import main
from pock_tvm.models import MLP
from pock_tvm.options import PipelineOptions


def test_compile_info_train(tmp_path, capsys):
    out = tmp_path / "prog"
    assert main(["compile", "mlp", "--scheme", "bias-only", "--input-shape", "4,32",
                 "--optimizer", "sgd", "--lr", "0.1", "-o", str(out)]) == 0
    assert "fc1" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "scheme: bias-only" in shown and "x[4, 32] float32" in shown and "steps done: 0" in shown

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((12, 32)).astype("float32"),
             y=rng.integers(0, 10, 12))
    assert main(["train", str(out), "--data", str(tmp_path / "data.npz"), "--epochs", "2"]) == 0
    assert "6 steps" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    assert "steps done: 6" in capsys.readouterr().out


def test_errors_are_one_line_with_the_fix(tmp_path, capsys):
    assert main(["compile", "nosuchmodel", "-o", str(tmp_path / "p")]) == 2
    assert "unknown model 'nosuchmodel'" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    assert main(["compile", "mlp", "--input-shape", "4,32", "--scheme", "last-1", "-o", str(tmp_path / "p")]) == 0
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 32), "float32"))
    assert main(["train", str(tmp_path / "p"), "--data", str(tmp_path / "bad.npz")]) == 2
    assert "lacks arrays ['x']" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert all(cmd in shown for cmd in ("compile", "info", "train", "demo"))


def test_deploy_flow_compile_for_rpi4_pack_data_and_run_over_rpc(tmp_path, capsys):
    import socket
    import subprocess

    from pock_tvm.targets.runner_build import build_runner

    bundle = tmp_path / "rpi4"
    assert main(["compile", "mlp", "--target", "rpi4", "--input-shape", "4,32", "-o", str(bundle)]) == 0
    capsys.readouterr()
    assert main(["info", str(bundle)]) == 0
    assert "target: rpi4 (aarch64, linux, cpu); lib.so: elf aarch64" in capsys.readouterr().out
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((9, 32)), y=rng.integers(0, 10, 9))
    assert main(["pack-data", str(bundle), str(tmp_path / "d.npz"), "-o", str(tmp_path / "d.bin")]) == 0
    assert "wrote 2 batches" in capsys.readouterr().out  # 9 samples, batch 4
    assert main(["run", str(bundle), "--data", str(tmp_path / "d.bin"), "--rpc", "nohost"]) == 2
    assert "--rpc expects HOST:PORT, got 'nohost'" in capsys.readouterr().err
    # the host runner serves host bundles; the emulated-board tests cover rpi4 over RPC
    host_bundle = tmp_path / "host"
    assert main(["compile", "mlp", "--input-shape", "4,32", "-o", str(host_bundle)]) == 0
    runner = build_runner("host", tmp_path / "runner")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(runner / "pock_runner"), "serve", "--port", str(port), "--dir", str(tmp_path),
                               "--trust", str(host_bundle)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "serving" in server.stdout.readline()
        capsys.readouterr()
        assert main(["run", str(host_bundle), "--data", str(tmp_path / "d.bin"), "--rpc", f"127.0.0.1:{port}"]) == 0
    finally:
        server.kill()
    out = capsys.readouterr().out
    assert "step 2 loss" in out and "steps 2 mean_time_ms" in out


def test_compile_refuses_to_replace_a_users_folder_and_takes_optimization_levels(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    assert main(["compile", "mlp", "--input-shape", "4,32", "-o", str(folder)]) == 2
    assert "is a directory that is not a pock_tvm bundle (it holds cat.jpg)" in capsys.readouterr().err
    assert (folder / "cat.jpg").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["compile", "mlp", "--input-shape", "4,32", "--lr", "-1", "-o", str(tmp_path / "p")])
    assert exit_.value.code == 2
    assert "argument --lr: takes a finite number >= 0, got '-1'" in capsys.readouterr().err
    assert main(["compile", "mlp", "--input-shape", "4,32", "--opt", "O0", "-o", str(tmp_path / "p")]) == 0
    from pock_tvm.runtime.bundle import read_manifest

    assert all(t["passed"] for t in read_manifest(tmp_path / "p")["tensors"])  # O0: nothing folded
    assert main(["compile", "mlp", "--input-shape", "4,32", "--disable", "in_plce", "-o", str(tmp_path / "q")]) == 2
    assert "unknown optimization ['in_plce']" in capsys.readouterr().err


def test_profile_names_the_kernels_that_take_the_time(tmp_path, capsys):
    assert main(["compile", "smallcnn", "--input-shape", "2,3,16,16", "-o", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    assert main(["profile", str(tmp_path / "p"), "--steps", "2", "--top", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("step ") and "GFLOP/s" in out and "SGEMM on this machine, same run" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("kernel "))
    assert lines[header].split()[-2:] == ["of", "SGEMM"]  # each rate also as its share of the peak
    rows = [line.split() for line in lines[header + 1:header + 5]]
    assert len(rows) == 4 and all(r[2].endswith("%") for r in rows)
    shares = [float(r[2].rstrip("%")) for r in rows]
    assert shares == sorted(shares, reverse=True) and any("conv2d" in r[0] for r in rows)
    classes = next(i for i, line in enumerate(lines) if line.startswith("kernel class "))
    assert "conv2d" in {line.split()[0] for line in lines[classes + 1:] if line.strip()}
    from pock_tvm.runtime.bundle import read_manifest

    assert read_manifest(tmp_path / "p")["state_file"] == "params.bin"  # profiling saves nothing


def test_tune_flags_name_what_is_missing(capsys):
    assert main(["tune", "mlp", "--input-shape", "4,32", "--target", "rpi4", "--db", "unused"]) == 2
    assert "does not run on this machine" in capsys.readouterr().err
    assert main(["tune", "mlp", "--input-shape", "4,32", "--tracker", "127.0.0.1:9190", "--db", "unused"]) == 2
    assert "--tracker needs --key" in capsys.readouterr().err
    assert main(["tune", "mlp", "--input-shape", "4,32", "--target", "rpi4"]) == 2
    assert "give --db DIR for target rpi4" in capsys.readouterr().err


def test_tune_reads_what_to_compile_from_a_bundle(tmp_path, capsys):
    from pock_tvm.cli.commands import _bundle_source
    from pock_tvm.optim import Adam

    bundle = tmp_path / "b"
    assert main(["compile", "mlp", "--scheme", "last-1", "--input-shape", "4,32", "--optimizer", "adam",
                 "--lr", "0.002", "--opt", "O2", "-o", str(bundle)]) == 0
    model, scheme, shape, loss, optimizer, options, target = _bundle_source(bundle)
    assert (model, scheme, shape, loss, target) == ("mlp", "last-1", (4, 32), "cross_entropy", "host")
    assert optimizer == Adam(lr=0.002) and options == PipelineOptions.preset("O2")
    # a bundle saved from Python does not know its model
    torch.manual_seed(0)
    pock_tvm.compile(MLP(), (torch.zeros(4, 32),), scheme="last-1").save(tmp_path / "py")
    capsys.readouterr()
    assert main(["tune", str(tmp_path / "py")]) == 2
    assert "does not say which model it was compiled from" in capsys.readouterr().err


def test_compile_verify_checks_every_kernel_and_says_so(tmp_path, capsys):
    assert main(["compile", "mlp", "--input-shape", "4,32", "--verify", "-o", str(tmp_path / "p")]) == 0
    assert "kernels verified against their unscheduled form: all agree" in capsys.readouterr().out


def test_disable_names_every_optimization(capsys):
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert all(name in shown for name in PipelineOptions.__dataclass_fields__)


def test_compile_help_names_every_model_scheme_and_target_from_their_registries(capsys):
    from pock_tvm.models import MODEL_NAMES
    from pock_tvm.scheme import PRESETS as SCHEMES
    from pock_tvm.targets.presets import PRESETS as TARGETS

    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for names in (MODEL_NAMES, SCHEMES, TARGETS):
        assert all(name in shown for name in names), names


def test_the_cli_starts_without_importing_torch_or_tvm():
    import subprocess
    import sys

    code = "import sys, pock_tvm.cli.main; print(sorted(m for m in ('torch', 'tvm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # `pock-tvm --help` answers in a fraction of a second


def test_train_with_a_prefix_cache_ends_where_the_plain_training_ends(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((12, 32)).astype("float32"), y=rng.integers(0, 10, 12))
    import shutil

    assert main(["compile", "mlp", "--scheme", "last-1", "--input-shape", "4,32", "--prefix-cache",
                 "-o", str(tmp_path / "plain")]) == 0
    shutil.copytree(tmp_path / "plain", tmp_path / "cached")  # the same initial weights
    states = []
    for name, flags in (("plain", []), ("cached", ["--prefix-cache", "float32"])):
        bundle = tmp_path / name
        assert main(["train", str(bundle), "--data", str(tmp_path / "data.npz"), "--epochs", "2", *flags]) == 0
        states.append(pock_tvm.load(bundle).state_dict())
    for key, value in states[0].items():
        np.testing.assert_allclose(states[1][key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    plain = tmp_path / "no-prefix"
    assert main(["compile", "mlp", "--scheme", "last-1", "--input-shape", "4,32", "-o", str(plain)]) == 0
    capsys.readouterr()
    assert main(["train", str(plain), "--data", str(tmp_path / "data.npz"), "--prefix-cache", "int8"]) == 2
    assert "compile with prefix_cache=True" in capsys.readouterr().err
