"""The rpi4 bundle and runner, cross-built here and run under qemu-aarch64, train like the host."""

import socket
import subprocess

import numpy as np
import pytest
import torch

import pock_tvm
from pock_tvm.models import SmallCNN
from pock_tvm.runtime.bundle import read_manifest, read_state, write_batches
from helpers import needs_cross_tools, tiny_llama

pytestmark = needs_cross_tools
STEPS = 3


def _run(runner, *args, qemu=True):
    cmd = (["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu"] if qemu else []) + [str(runner / "pock_runner"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _losses(stdout):
    return [float(line.split()[3]) for line in stdout.splitlines() if line.startswith("step ")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, rpi4_runner):
    tmp = tmp_path_factory.mktemp("rpi4")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((STEPS * 2, 3, 16, 16)).astype("float32")
    y = (np.arange(STEPS * 2) % 10).astype("int64")

    def compile_for(target):
        torch.manual_seed(0)
        return pock_tvm.compile(SmallCNN(), (torch.zeros(2, 3, 16, 16),), scheme="last-2",
                                optimizer=pock_tvm.Adam(lr=1e-2), target=target)

    host = compile_for("host")
    host_losses = [host.step(x[2 * i:2 * i + 2], y[2 * i:2 * i + 2]) for i in range(STEPS)]
    bundle = compile_for("rpi4").save(tmp / "bundle")
    write_batches(tmp / "data.bin", host.layout, [x], y)
    result = _run(rpi4_runner, "train", bundle, tmp / "data.bin", "--steps", STEPS)
    assert result.returncode == 0, result.stderr[-2000:]
    return host, host_losses, bundle, tmp / "data.bin", result.stdout


def test_losses_match_the_host(runs):
    _, host_losses, _, _, stdout = runs
    np.testing.assert_allclose(_losses(stdout), host_losses, rtol=1e-5)


def test_updated_parameters_and_state_match_the_host(runs):
    host, _, bundle, _, stdout = runs
    manifest = read_manifest(bundle)  # hashes of the state the runner committed
    assert manifest["state_file"] == f"params.{STEPS}.bin" and f"saved {bundle}/params.{STEPS}.bin" in stdout
    device = read_state(bundle, manifest)
    for name, value in host.optimizer_state().items():
        np.testing.assert_allclose(device[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    for p in host.layout.params:
        np.testing.assert_allclose(device[p.var], host._value(p), rtol=1e-5, atol=1e-6, err_msg=p.var)


def test_runner_reports_training_memory_and_the_optimizer_state(runs):
    host, _, _, _, stdout = runs
    fields = next(line.split() for line in stdout.splitlines() if line.startswith("memory "))
    values = dict(zip(fields[1::2], map(int, fields[2::2])))
    state = sum(host.optimizer_state()[k].nbytes for k in host.layout.state_keys())  # Adam's m and v
    assert values["optimizer_state_kib"] == -(-state // 1024) > 0
    assert values["train_peak_kib"] > 0 and values["loaded_kib"] > 0


def test_eval_runs_the_forward(runs, rpi4_runner):
    _, _, bundle, data, _ = runs
    result = _run(rpi4_runner, "eval", bundle, data)
    assert result.returncode == 0 and "eval samples 6 accuracy" in result.stdout


def test_runner_errors_name_the_problem_and_the_fix(runs, rpi4_runner, host_runner, tmp_path):
    _, _, bundle, data, _ = runs
    wrong = _run(host_runner, "info", bundle, qemu=False)
    assert wrong.returncode == 1
    assert "bundle is built for rpi4 (aarch64, linux)" in wrong.stderr and "build-runner --target rpi4" in wrong.stderr
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(bundle), str(copy)], check=True)
    state = copy / read_manifest(copy)["state_file"]
    state.write_bytes(state.read_bytes()[:-4])
    damaged = _run(rpi4_runner, "train", copy, data)
    assert damaged.returncode == 1 and "does not match its SHA-256 in manifest.json" in damaged.stderr
    (copy / "lib.so").unlink()
    missing = _run(rpi4_runner, "train", copy, data)
    assert "is missing lib.so, named in manifest.json" in missing.stderr
    (tmp_path / "short.bin").write_bytes(b"\0" * 10)
    short = _run(rpi4_runner, "train", bundle, tmp_path / "short.bin")
    assert short.returncode == 1 and "not a whole number of batches" in short.stderr


def test_rpc_server_on_the_board_runs_the_step_for_the_host(runs, rpi4_runner, tmp_path):
    from pock_tvm.cli.remote import run_remote

    host, host_losses, bundle, data, _ = runs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fresh = tmp_path / "fresh"
    torch.manual_seed(0)
    pock_tvm.compile(SmallCNN(), (torch.zeros(2, 3, 16, 16),), scheme="last-2",
                     optimizer=pock_tvm.Adam(lr=1e-2), target="rpi4").save(fresh)
    server = subprocess.Popen(["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu", str(rpi4_runner / "pock_runner"),
                               "serve", "--port", str(port), "--dir", str(tmp_path / "work"), "--trust", str(fresh)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    (tmp_path / "work").mkdir()
    try:
        assert "serving TVM RPC" in server.stdout.readline()
        rows = run_remote(fresh, data, f"127.0.0.1:{port}", steps=STEPS)
    finally:
        server.kill()
    np.testing.assert_allclose([r["loss"] for r in rows], host_losses, rtol=1e-5)
    assert all(r["time_ms"] > 0 for r in rows)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # make test-all; the feature keeps a faster test in make test
def test_tune_measures_candidates_on_the_emulated_board(rpi4_runner, tmp_path):
    """`pock-tvm tune --target rpi4 --rpc`: candidates cross-built here run on the board (path, not speed)."""
    from tvm.s_tir import meta_schedule as ms

    from pock_tvm.compiler.tune import tune
    from pock_tvm.compiler.tuning_device import TuningDevice

    port = _free_port()
    (tmp_path / "work").mkdir()
    server = subprocess.Popen(["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu", str(rpi4_runner / "pock_runner"),
                               "serve", "--port", str(port), "--dir", str(tmp_path / "work"), "--allow-remote-code"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "serving TVM RPC" in server.stdout.readline()
        torch.manual_seed(0)
        lines = []
        rows = tune(SmallCNN(), (torch.zeros(2, 3, 16, 16),), database=tmp_path / "db", kernels=1, trials=2,
                    report=lines.append, scheme="last-2", target="rpi4",
                    device=TuningDevice(rpc=f"127.0.0.1:{port}", timeout=300))
    finally:
        server.kill()
    assert [r.status for r in rows] == ["tuned"] and rows[0].tuned_ms > 0 and rows[0].default_ms > 0
    assert "measuring on the RPC server at 127.0.0.1" in lines[0]
    database = ms.database.JSONDatabase(work_dir=str(tmp_path / "db"))
    records = [r for w in database.get_all_tuning_records() for r in [w]]
    assert records and all(r.run_secs and "aarch64" in str(r.target.attrs["mtriple"]) for r in records)
    assert not list((tmp_path / "work").iterdir())  # candidates are removed from the board after each run


def test_tune_names_the_missing_device_for_a_board_target():
    from pock_tvm.compiler.tune import tune
    from pock_tvm.compiler.tuning_device import TuningDevice

    with pytest.raises(ValueError, match="does not run on this machine.*--rpc HOST:PORT"):
        tune(SmallCNN(), (torch.zeros(2, 3, 16, 16),), database="unused", kernels=1, trials=1, target="rpi4")
    with pytest.raises(ValueError, match="--tracker needs --key"):
        TuningDevice(tracker="127.0.0.1:9190")
    with pytest.raises(ValueError, match="--rpc expects HOST:PORT, got 'board'"):
        TuningDevice(rpc="board")


@pytest.mark.slow  # make test-all; the feature keeps a faster test in make test
def test_a_causal_lm_step_trains_on_the_board_like_the_host(tmp_path, rpi4_runner):
    """A tiny Llama (RMSNorm, rotary, causal + padding mask, SwiGLU, tied embeddings) with LoRA and
    the next-token loss: the rpi4 bundle under qemu gives the host's losses."""
    torch.manual_seed(0)
    model = tiny_llama()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (STEPS * 2, 8)).astype("int64")
    mask = np.ones_like(ids)
    mask[1::2, 6:] = 0
    labels = np.where(mask == 1, ids, -100)
    example = (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2]))

    def compile_for(target):
        return pock_tvm.compile(model, example, scheme="lora", loss="next_token",
                                optimizer=pock_tvm.Adam(lr=1e-2), target=target)

    host = compile_for("host")
    host_losses = [host.step(ids[2 * i:2 * i + 2], mask[2 * i:2 * i + 2], labels[2 * i:2 * i + 2])
                   for i in range(STEPS)]
    bundle = compile_for("rpi4").save(tmp_path / "bundle")
    write_batches(tmp_path / "data.bin", host.layout, [ids, mask], labels)
    result = _run(rpi4_runner, "train", bundle, tmp_path / "data.bin", "--steps", STEPS)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(_losses(result.stdout), host_losses, rtol=1e-5)
    assert host_losses[-1] < host_losses[0]


def test_an_int8_step_trains_on_the_board_like_the_host(tmp_path, rpi4_runner):
    """A model quantized by pock_tvm, frozen int8 weights passed as int8 tensors of the bundle
    (not folded), trained weights as float32 masters with QAS: the board gives the host's losses."""
    from pock_tvm.quantization.post_training import quantize

    rng = np.random.default_rng(0)
    x = rng.standard_normal((STEPS * 2, 3, 16, 16)).astype("float32")
    y = (np.arange(STEPS * 2) % 10).astype("int64")
    torch.manual_seed(0)
    quantized = quantize(SmallCNN().eval(), [x[:2], x[2:4]], (torch.zeros(2, 3, 16, 16),))
    options = pock_tvm.options.PipelineOptions(fold_frozen=False)

    def compile_for(target):
        return pock_tvm.compile(quantized, scheme="last-2", optimizer=pock_tvm.SGD(lr=0.05, momentum=0.9),
                                target=target, options=options)

    host = compile_for("host")
    host_losses = [host.step(x[2 * i:2 * i + 2], y[2 * i:2 * i + 2]) for i in range(STEPS)]
    bundle = compile_for("rpi4").save(tmp_path / "bundle")
    manifest = read_manifest(bundle)
    dtypes = {e["name"]: e["dtype"] for e in manifest["tensors"]}
    assert "int8" in dtypes.values() and manifest["layout"]["extra"]["quantization"]["tensors"]
    write_batches(tmp_path / "data.bin", host.layout, [x], y)
    result = _run(rpi4_runner, "train", bundle, tmp_path / "data.bin", "--steps", STEPS)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(_losses(result.stdout), host_losses, rtol=1e-5)
    assert host_losses[-1] < host_losses[0]
