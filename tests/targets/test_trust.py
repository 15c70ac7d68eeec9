"""Untrusted input to the bundle reader, the runner and its RPC server: clear errors, never a crash,
never a file outside the bundle or the work directory touched, never a NaN saved, never two writers."""

import copy
import json
import os
import random
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
import torch

import pock_tvm
from pock_tvm.models import MLP
from pock_tvm.runtime.bundle import read_manifest, write_batches
from pock_tvm.runtime.files import locked
from helpers import needs_cmake

pytestmark = needs_cmake


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """An SGD bundle of the MLP (full scheme, so the first layer sees the input) and a data file."""
    tmp = tmp_path_factory.mktemp("trust")
    torch.manual_seed(0)
    program = pock_tvm.compile(MLP(), (torch.randn(4, 32),), scheme="full", optimizer=pock_tvm.SGD(lr=0.05))
    bundle = program.save(tmp / "bundle")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 32)).astype("float32"), rng.integers(0, 10, 8)
    write_batches(tmp / "data.bin", program.layout, [x], y)
    return program, bundle, tmp / "data.bin", x, y


def _copy(bundle, dest):
    shutil.copytree(bundle, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def _runner(runner, *args, **kwargs):
    return subprocess.run([str(runner / "pock_runner"), *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kwargs)


def _with_value(data, dest, position, value):
    """A copy of the runner data file ``data`` with float32 ``position`` of its first input set to
    ``value`` (a file pack-data would refuse to write)."""
    raw = bytearray(data.read_bytes())
    raw[4 * position:4 * position + 4] = np.float32(value).tobytes()
    dest.write_bytes(bytes(raw))
    return dest


def _state(bundle):
    return {f.name: f.read_bytes() for f in bundle.iterdir() if f.name != ".lock"}


# ---- manifests --------------------------------------------------------------------------------
def _mutations(manifest):
    """(what, change) pairs that each break one thing a reader relies on."""
    first = manifest["tensors"][0]["name"]
    args = manifest["calling"]["train_step"]["args"]
    return [
        ("a file outside the bundle", lambda m: m["files"].update({"../../etc/passwd": "0" * 64})),
        ("library path out of the bundle", lambda m: m.update(library="../lib.so")),
        ("a vocabulary bound on a float input", lambda m: m["layout"]["inputs"][0].update(bound=3)),
        ("absolute state file", lambda m: m.update(state_file="/etc/passwd")),
        ("hidden state file", lambda m: m.update(state_file=".params.bin")),
        ("library not hash-listed", lambda m: m["files"].pop(m["library"])),
        ("negative offset", lambda m: m["tensors"][0].update(offset=-8)),
        ("offset past the end", lambda m: m["tensors"][0].update(offset=10 ** 12)),
        ("nbytes disagrees with shape", lambda m: m["tensors"][0].update(nbytes=4)),
        ("negative dimension", lambda m: m["tensors"][0].update(shape=[-1, 32])),
        ("shape edited", lambda m: m["tensors"][0].update(shape=[32, 64], nbytes=32 * 64 * 4)),
        ("unknown dtype", lambda m: m["tensors"][0].update(dtype="complex64")),
        ("dtype edited", lambda m: m["tensors"][0].update(dtype="int32")),
        ("no step tensor", lambda m: m.update(tensors=[t for t in m["tensors"] if t["role"] != "step"])),
        ("duplicate tensor", lambda m: m["tensors"].append(copy.deepcopy(m["tensors"][0]))),
        ("unknown role", lambda m: m["tensors"][0].update(role="weights")),
        ("offset of the wrong type", lambda m: m["tensors"][0].update(offset="0")),
        ("calling names an unknown tensor", lambda m: m["calling"]["train_step"]["args"].__setitem__(1, "nope")),
        ("calling order swapped", lambda m: m["calling"]["train_step"].update(
            args=[args[0], args[2], args[1], *args[3:]])),
        ("no calling convention", lambda m: m.pop("calling")),
        ("tensors not a list", lambda m: m.update(tensors={first: 0})),
        ("target not an object", lambda m: m.update(target="host")),
    ]


def test_every_damaged_manifest_is_a_clear_error_in_python_and_the_runner(made, host_runner, tmp_path):
    _, bundle, data, _, _ = made
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep me")
    original = json.loads((bundle / "manifest.json").read_text())
    for i, (what, change) in enumerate(_mutations(original)):
        copy_dir = _copy(bundle, tmp_path / f"m{i}")
        manifest = copy.deepcopy(original)
        change(manifest)
        (copy_dir / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError) as err:
            pock_tvm.load(copy_dir)
        assert "manifest.json" in str(err.value) or "library" in str(err.value), what
        result = _runner(host_runner, "train", copy_dir, data, "--steps", 1)
        assert result.returncode == 1, (what, result.returncode, result.stderr[-500:])
        assert "pock_runner: error:" in result.stderr, what
    assert victim.read_bytes() == b"keep me"


def test_random_manifest_damage_never_crashes(made, host_runner, tmp_path):
    _, bundle, data, _, _ = made
    original = json.loads((bundle / "manifest.json").read_text())
    rng = random.Random(0)
    junk = [None, -1, 2 ** 62, "../x", "", [], {}, 1.5, True, "abc", [-1], {"a": 1}]

    def paths(node, prefix=()):
        yield prefix
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, value in children:
            if key != "report":
                yield from paths(value, (*prefix, key))

    every = [p for p in paths(original) if p]
    for i in range(40):
        manifest = copy.deepcopy(original)
        path = rng.choice(every)
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = rng.choice(junk)
        copy_dir = _copy(bundle, tmp_path / f"r{i}")
        (copy_dir / "manifest.json").write_text(json.dumps(manifest))
        try:
            pock_tvm.load(copy_dir)
        except ValueError:
            pass  # a clear error; anything else fails the test
        result = _runner(host_runner, "train", copy_dir, data, "--steps", 1, "--no-save")
        assert result.returncode in (0, 1), (path, result.returncode, result.stderr[-500:])
        assert result.returncode == 0 or "pock_runner: error:" in result.stderr, path


def test_runner_never_deletes_outside_the_bundle(made, host_runner, tmp_path):
    _, bundle, data, _, _ = made
    copy_dir = _copy(bundle, tmp_path / "b")
    outside = tmp_path / "params.bin"
    shutil.copy(copy_dir / "params.bin", outside)
    manifest = json.loads((copy_dir / "manifest.json").read_text())
    manifest["files"]["../params.bin"] = manifest["files"].pop("params.bin")
    manifest["state_file"] = "../params.bin"
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    result = _runner(host_runner, "train", copy_dir, data, "--steps", 1)
    assert result.returncode == 1 and "plain file name inside the bundle" in result.stderr
    assert outside.exists()


# ---- writers: locks, leftovers, non-finite state ------------------------------------------------
def test_a_locked_bundle_is_not_trained_twice(made, host_runner, tmp_path):
    from pock_tvm.cli.commands import train

    _, bundle, data, x, y = made
    copy_dir = _copy(bundle, tmp_path / "b")
    before = _state(copy_dir)
    with locked(copy_dir, "test"):  # as a second trainer would hold it
        result = _runner(host_runner, "train", copy_dir, data, "--steps", 1)
    assert result.returncode == 1 and "is in use by another process" in result.stderr
    holder = subprocess.Popen(["flock", str(copy_dir / ".lock"), "sleep", "30"])
    try:
        time.sleep(0.5)
        np.savez(tmp_path / "d.npz", x=x, y=y)
        with pytest.raises(ValueError, match="is in use by another process"):
            train(str(copy_dir), str(tmp_path / "d.npz"))
    finally:
        holder.kill()
    assert _state(copy_dir) == before


def test_leftovers_of_a_killed_writer_are_cleaned_on_the_next_open(made, host_runner, tmp_path):
    _, bundle, data, _, _ = made
    copy_dir = _copy(bundle, tmp_path / "b")
    for name in ("params.9.bin.tmp", "params.5.bin", "manifest.json.tmp"):
        (copy_dir / name).write_bytes(b"partial")
    result = _runner(host_runner, "train", copy_dir, data, "--steps", 1)
    assert result.returncode == 0, result.stderr
    assert sorted(f.name for f in copy_dir.iterdir()) == [".lock", "lib.so", "manifest.json", "params.1.bin"]
    # a Program.save killed between its two renames, on a system without renameat2
    dead = tmp_path / ".b.pock-old-999999999-0"
    os.replace(copy_dir, dead)
    (tmp_path / ".b.pock-tmp-999999999-abc").mkdir()
    assert read_manifest(copy_dir)["state_file"] == "params.1.bin"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".b.")) == []


def test_diverged_or_nan_weights_are_never_saved(made, host_runner, tmp_path):
    from pock_tvm.cli.commands import train

    program, bundle, _, x, y = made
    copy_dir = _copy(bundle, tmp_path / "b")
    before = _state(copy_dir)
    # NaN in the input (ReLU would turn it into 0, the loss stay finite, the first layer's weights
    # not): refused by pack-data, and by the runner in a file written by other means
    nan_x = x.copy()
    nan_x[0, 0] = np.nan
    with pytest.raises(ValueError, match="input 'x' holds nan at position 0"):
        write_batches(tmp_path / "nan.bin", program.layout, [nan_x], y)
    result = _runner(host_runner, "train", copy_dir, _with_value(made[2], tmp_path / "nan.bin", 0, np.nan),
                     "--steps", 1)
    assert result.returncode == 1 and "'x' holds NaN (batch 0, position 0)" in result.stderr
    result = _runner(host_runner, "train", copy_dir, made[2], "--steps", 1, "--lr", "1e38")
    assert result.returncode == 1 and "training diverged" in result.stderr
    assert _state(copy_dir) == before
    np.savez(tmp_path / "big.npz", x=x * 1e30, y=y)
    with pytest.raises(ValueError, match=r"non-finite|diverged"):
        train(str(copy_dir), str(tmp_path / "big.npz"), lr=1e30)
    assert _state(copy_dir) == before


def test_labels_outside_the_classes_are_refused_everywhere(made, host_runner, tmp_path):
    from pock_tvm.cli.commands import pack_data

    program, bundle, _, x, y = made
    fresh = pock_tvm.load(bundle)
    bad = y.copy()
    bad[3] = 10
    with pytest.raises(ValueError, match=r"label 10 at position 3 is outside \[0, 10\)"):
        fresh.step(x[:4], bad[:4])
    np.savez(tmp_path / "bad.npz", x=x, y=np.where(np.arange(8) == 5, -1, y))
    with pytest.raises(ValueError, match=r"label -1 at position 5"):
        pack_data(str(bundle), str(tmp_path / "bad.npz"), str(tmp_path / "bad.bin"))
    assert not (tmp_path / "bad.bin").exists()
    raw = bytearray((made[2]).read_bytes())  # the runner reads labels it never saw checked
    raw[4 * 32 * 4: 4 * 32 * 4 + 8] = np.int64(2 ** 40).tobytes()
    (tmp_path / "huge.bin").write_bytes(bytes(raw))
    result = _runner(host_runner, "train", _copy(bundle, tmp_path / "b"), tmp_path / "huge.bin")
    assert result.returncode == 1 and f"label {2 ** 40} (batch 0, sample 0) is outside [0, 10)" in result.stderr


class _Bag(torch.nn.Module):
    """Token ids -> an embedding of 20 rows -> mean -> 3 classes."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


def test_token_ids_outside_the_vocabulary_are_refused_everywhere(host_runner, tmp_path):
    program = pock_tvm.compile(_Bag(), (torch.zeros(2, 5, dtype=torch.int64),), scheme="full")
    bundle = program.save(tmp_path / "bundle")
    assert read_manifest(bundle)["layout"]["inputs"][0]["bound"] == 20
    ids, y = np.random.default_rng(0).integers(0, 20, (4, 5)), np.array([0, 1, 2, 0])
    bad = ids.copy()
    bad[1, 2] = 20
    with pytest.raises(ValueError, match=r"pack-data: input 'ids' holds 20 at position 7, outside \[0, 20\)"):
        write_batches(tmp_path / "bad.bin", program.layout, [bad], y)
    write_batches(tmp_path / "data.bin", program.layout, [ids], y)
    raw = bytearray((tmp_path / "data.bin").read_bytes())  # the runner reads ids it never saw checked
    raw[8 * 7: 8 * 8] = np.int64(-3).tobytes()  # batch 0, position 7
    (tmp_path / "data.bin").write_bytes(bytes(raw))
    result = _runner(host_runner, "train", bundle, tmp_path / "data.bin")
    assert result.returncode == 1 and "input 'ids' holds -3 (batch 0, position 7), outside [0, 20)" in result.stderr


def test_runner_command_line_takes_only_numbers(made, host_runner):
    _, bundle, data, _, _ = made
    for args, message in [(["--steps", "3x"], "--steps takes an integer"), (["--lr", "nan"], "--lr takes a finite"),
                          (["--lr", "-0.1"], "--lr takes a finite"), (["--steps", ""], "--steps takes an integer")]:
        result = _runner(host_runner, "train", bundle, data, *args)
        assert result.returncode == 1 and message in result.stderr, args
    result = _runner(host_runner, "serve", "--port", "http")
    assert result.returncode == 1 and "--port takes an integer in [0, 65535], got 'http'" in result.stderr


# ---- the RPC server -------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(runner, workdir, *args, **popen):
    port = _free_port()
    where = ["--dir", str(workdir)] if workdir is not None else []
    server = subprocess.Popen([str(runner / "pock_runner"), "serve", "--port", str(port), *where, *map(str, args)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **popen)
    line = server.stdout.readline()
    assert "serving TVM RPC on 127.0.0.1:" in line, line
    return server, port


def _handshake(port, trickle=0.0):
    """TVM's RPC handshake by hand: the magic, then "client:" key; returns the socket after the answer
    (``None`` when the server closed it). ``trickle`` > 0 sends one byte at a time, that many seconds apart."""
    sock = socket.create_connection(("127.0.0.1", port))
    message = np.int32(0xFF271).tobytes() + np.int32(7).tobytes() + b"client:"
    try:
        for i in range(0, len(message), 1 if trickle else len(message)):
            sock.sendall(message[i:i + (1 if trickle else len(message))])
            time.sleep(trickle)
        sock.settimeout(5)
        answer = sock.recv(4)
    except OSError:
        answer = b""
    if len(answer) != 4:
        sock.close()
        return None
    return sock


def _listening_address(port: int) -> str:
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            return socket.inet_ntoa(bytes.fromhex(local.split(":")[0])[::-1])
    raise AssertionError(f"nothing listens on {port}")


def test_rpc_server_binds_loopback_and_keeps_files_in_its_directory(made, host_runner, tmp_path):
    from tvm import rpc

    _, bundle, _, _, _ = made
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    server, port = _serve(host_runner, work)
    try:
        assert _listening_address(port) == "127.0.0.1"
        remote = rpc.connect("127.0.0.1", port)
        for bad in ("../evil.txt", "/tmp/evil.txt", "a/../../evil.txt"):
            with pytest.raises(Exception, match="files stay inside the server's --dir"):
                remote.upload(bytearray(b"x"), bad)
        with pytest.raises(Exception, match="files stay inside"):
            remote.download("../secret.txt")
        with pytest.raises(Exception, match="files stay inside"):
            remote.remove("../secret.txt")
        remote.upload(bytearray(b"fine"), "ok.txt")
        assert (work / "ok.txt").read_bytes() == b"fine" and (tmp_path / "secret.txt").exists()
        assert not (tmp_path / "evil.txt").exists()
        # an uploaded library is code: refused unless trusted
        remote.upload(str(bundle / "lib.so"))
        with pytest.raises(Exception, match="refused to load 'lib.so'.*--trust BUNDLE"):
            remote.load_module("lib.so")
        with pytest.raises(Exception, match="'ffi.ModuleLoadFromFile' is not on the allow-list"):
            remote.get_function("ffi.ModuleLoadFromFile")(str(work / "lib.so"))
    finally:
        server.kill()


def test_rpc_server_loads_trusted_bundles_and_serves_clients_one_after_another(made, host_runner, tmp_path):
    from tvm import rpc

    _, bundle, _, _, _ = made
    server, port = _serve(host_runner, tmp_path, "--trust", bundle, "--handshake-timeout", 1)
    try:
        idle = socket.create_connection(("127.0.0.1", port))  # says nothing: must not block the next
        start = time.monotonic()
        remote = rpc.connect("127.0.0.1", port)
        remote.upload(str(bundle / "lib.so"))
        assert remote.load_module("lib.so") is not None
        assert time.monotonic() - start < 30
        idle.close()
    finally:
        server.kill()


@pytest.mark.parametrize("name", ["vm.builtin.tensor_cache.load", "vm.builtin.tensor_cache.get",
                                  "runtime.LoadParams", "runtime.SaveParamsToFile", "relax.ExecutableLoadFromFile",
                                  "rpc.Connect", "ffi.ModuleLoadFromFile", "ffi.Module.load_from_file.so",
                                  "runtime.ModuleLoadStaticLibrary", "ffi.SystemLib", "testing.echo"])
def test_rpc_server_refuses_every_function_off_the_allow_list(host_runner, tmp_path, name):
    from tvm import rpc

    server, port = _serve(host_runner, tmp_path, "--allow-remote-code")  # the allow-list holds even here
    try:
        remote = rpc.connect("127.0.0.1", port)
        with pytest.raises(Exception, match=f"remote function '{name}' is not on the allow-list"):
            remote.get_function(name)
        remote.upload(bytearray(b"still served"), "after.txt")  # the session goes on after a refusal
        assert (tmp_path / "after.txt").read_bytes() == b"still served"
    finally:
        server.kill()
        log = server.stdout.read()
    assert f"refused: remote function '{name}'" in log


def test_rpc_server_reads_and_writes_nothing_outside_its_directory_through_the_runtime(host_runner, tmp_path):
    """The probe's attacks: a tensor cache pointing out of --dir, params saved to an absolute path, a
    time evaluator naming a global function, an RPC proxy to another port."""
    from tvm import rpc

    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "secret").write_bytes(b"secret bytes")
    server, port = _serve(host_runner, work)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    try:
        remote = rpc.connect("127.0.0.1", port)
        remote.upload(bytearray(json.dumps({"records": [{"dataPath": "../secret", "format": "raw-shard",
                                                         "nbytes": 12, "records": []}]}).encode()),
                      "tensor-cache.json")
        for name in ("vm.builtin.tensor_cache.load", "runtime.SaveParamsToFile", "runtime.LoadParams"):
            with pytest.raises(Exception, match="not on the allow-list"):
                remote.get_function(name)
        evaluator = remote.get_function("runtime.RPCTimeEvaluator")
        for module, preproc in ((None, ""), (None, "runtime.SaveParamsToFile")):
            with pytest.raises(Exception, match="time_evaluator times a function of a module loaded"):
                evaluator(module, "runtime.SaveParamsToFile", 1, 0, 1, 1, 0, 0, 0, 0, 0, preproc)
        with pytest.raises(Exception, match="a session constructor .* is not allowed"):
            rpc.connect("127.0.0.1", port, session_constructor_args=[
                "rpc.Connect", "127.0.0.1", listener.getsockname()[1], "", False])
        with pytest.raises(socket.timeout):
            listener.accept()  # the server opened no outbound connection
    finally:
        server.kill()
        listener.close()
    assert (tmp_path / "secret").read_bytes() == b"secret bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret", "work"]


def test_rpc_server_without_dir_uses_a_fresh_private_directory(host_runner, tmp_path):
    from tvm import rpc

    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    (home / ".ssh").mkdir()
    (home / ".ssh" / "authorized_keys").write_text("mine")
    server, port = _serve(host_runner, None, cwd=home, env={**os.environ, "TMPDIR": str(tmp)})
    try:
        remote = rpc.connect("127.0.0.1", port)
        remote.upload(bytearray(b"planted"), "authorized_keys")
        with pytest.raises(Exception):
            remote.download(".ssh/authorized_keys")
        remote.remove(".ssh/authorized_keys")
    finally:
        server.kill()
    assert (home / ".ssh" / "authorized_keys").read_text() == "mine"
    assert sorted(p.name for p in home.iterdir()) == [".ssh"]
    (private,) = tmp.iterdir()
    assert private.name.startswith("pock_runner-") and (private / "authorized_keys").read_bytes() == b"planted"
    assert private.stat().st_mode & 0o077 == 0  # only the server's user can read it
    result = _runner(host_runner, "serve", "--port", str(_free_port()), "--dir", tmp_path / "missing")
    assert result.returncode == 1 and "--dir '" in result.stderr and "is not an existing directory" in result.stderr


def test_rpc_handshake_has_a_total_deadline_and_sessions_are_bounded(host_runner, tmp_path):
    from tvm import rpc

    server, port = _serve(host_runner, tmp_path, "--handshake-timeout", 2, "--max-sessions", 1)
    try:
        # one byte every 0.4 s: each recv is quick, the handshake as a whole is not
        start = time.monotonic()
        assert _handshake(port, trickle=0.4) is None
        assert time.monotonic() - start < 5
        # the only session is held: the next client waits in the queue, then is served when it ends
        held = rpc.connect("127.0.0.1", port)
        waiting = socket.create_connection(("127.0.0.1", port))
        waiting.sendall(np.int32(0xFF271).tobytes() + np.int32(7).tobytes() + b"client:")
        waiting.settimeout(1.5)
        with pytest.raises(socket.timeout):
            waiting.recv(4)
        del held  # the client shuts its session down
        waiting.settimeout(10)
        assert np.frombuffer(waiting.recv(4), "int32")[0] == 0xFF271
        waiting.close()
    finally:
        server.kill()


def test_rpc_server_serves_sessions_side_by_side(made, host_runner, tmp_path):
    from tvm import rpc

    server, port = _serve(host_runner, tmp_path, "--max-sessions", 3, "--handshake-timeout", 30)
    try:
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]  # two stuck handshakes
        start = time.monotonic()
        remote = rpc.connect("127.0.0.1", port)
        remote.upload(bytearray(b"x"), "x.txt")
        assert time.monotonic() - start < 10
        for sock in silent:
            sock.close()
    finally:
        server.kill()


# ---- values no check bounded before (issue 21, items 5-11) ---------------------------------------
def test_the_runner_refuses_nan_data_and_never_saves_a_model_that_predicts_inf(made, host_runner, tmp_path):
    from pock_tvm.cli.commands import train

    program, bundle, data, x, y = made
    copy_dir = _copy(bundle, tmp_path / "b")
    before = _state(copy_dir)
    result = _runner(host_runner, "train", copy_dir, _with_value(data, tmp_path / "inf.bin", 2 * 32 + 5, np.inf))
    assert result.returncode == 1 and "'x' holds inf (batch 0, position 69)" in result.stderr
    with pytest.raises(ValueError, match=r"input 'x' holds nan at position 5"):
        program.predict(np.where(np.arange(32) == 5, np.nan, x[:4]).astype("float32"))
    # one step so large that the weights stay finite (about 1e30) but the outputs overflow
    for lr in ("1e30", "3e37"):
        result = _runner(host_runner, "train", copy_dir, data, "--steps", 1, "--lr", lr)
        assert result.returncode == 1 and "training diverged" in result.stderr, result.stderr[-300:]
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(ValueError, match="training diverged|non-finite"):
        train(str(copy_dir), str(tmp_path / "d.npz"), lr=3e37)
    assert _state(copy_dir) == before


def test_edited_manifests_cannot_switch_the_label_check_off(made, host_runner, tmp_path):
    """Raising the number of classes, or calling the loss mse, let labels of 9e7 reach the kernel
    (a segfault): the manifest must fit the loss, and the library checks each label it indexes with."""
    _, bundle, data, _, _ = made
    original = json.loads((bundle / "manifest.json").read_text())
    raw = bytearray(data.read_bytes())
    raw[4 * 32 * 4: 4 * 32 * 4 + 8] = np.int64(90_000_000).tobytes()
    (tmp_path / "big.bin").write_bytes(bytes(raw))
    edits = {
        "more classes": lambda m: m["layout"]["output"].update(shape=[4, 10 ** 8]),
        "loss mse": lambda m: m["layout"].update(loss="mse"),
        "target float": lambda m: m["layout"]["target"].update(dtype="float32"),
        "negative lr": lambda m: m["layout"]["optimizer"].update(lr=-0.5),
    }
    for i, (what, edit) in enumerate(edits.items()):
        copy_dir = _copy(bundle, tmp_path / f"e{i}")
        manifest = copy.deepcopy(original)
        edit(manifest)
        (copy_dir / "manifest.json").write_text(json.dumps(manifest))
        for command in ("train", "eval"):
            result = _runner(host_runner, command, copy_dir, tmp_path / "big.bin")
            assert result.returncode == 1 and "pock_runner: error:" in result.stderr, (what, command, result.stderr)
        try:
            edited = pock_tvm.load(copy_dir)
        except ValueError as err:
            assert "manifest.json" in str(err), what
            continue
        with pytest.raises(ValueError, match=r"label 90000000|index out of range in the loss"):  # never a crash
            edited.step(np.zeros((4, 32), "float32"), np.array([0, 1, 2, 90_000_000]))
    # what the manifest cannot hide: the compiled step checks the labels itself
    program = pock_tvm.load(bundle)
    program.layout.check_target = lambda *a, **k: None  # as if the Python check were edited away too
    with pytest.raises(ValueError, match=r"index out of range in the loss over 10 classes"):
        program.step(np.zeros((4, 32), "float32"), np.array([0, 1, 2, 90_000_000]))


def test_deeply_nested_or_truncated_bundles_are_clear_errors(made, host_runner, tmp_path):
    from pock_tvm.runtime.bundle import sha256

    _, bundle, data, _, _ = made
    nested = _copy(bundle, tmp_path / "nested")
    (nested / "manifest.json").write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(ValueError, match="not valid JSON"):
        pock_tvm.load(nested)
    result = _runner(host_runner, "train", nested, data)
    assert result.returncode == 1 and "nests deeper than 64 levels" in result.stderr
    truncated = _copy(bundle, tmp_path / "truncated")
    lib = truncated / "lib.so"
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    manifest = json.loads((truncated / "manifest.json").read_text())
    manifest["files"]["lib.so"] = sha256(lib)  # as someone covering their tracks would
    (truncated / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"library .* is damaged \(.* past the end of the file\)"):
        pock_tvm.load(truncated)
    result = _runner(host_runner, "train", truncated, data)
    assert result.returncode == 1 and "is damaged" in result.stderr, result.stderr[-300:]


def test_learning_rates_float32_cannot_hold_are_refused():
    with pytest.raises(ValueError, match=r"learning rate must be a finite number >= 0 that float32 holds \(<= 3.4e\+38\)"):
        pock_tvm.optim.check_lr(1e39)
    with pytest.raises(ValueError, match=r"SGD.lr must be a finite number"):
        pock_tvm.SGD(lr=1e39)
