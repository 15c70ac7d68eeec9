"""A Flower federation on this machine: one SuperLink and SuperNodes as processes (Flower's
Deployment Engine), and pock_tvm's Flower App run on them with ``flwr run``.

Every process binds loopback (127.0.0.1) unless told otherwise; a federation on another address
needs TLS (:class:`TLS`, passed through to Flower's ``--ssl-*`` / ``--root-certificates``). Node
authentication and other Flower options pass through as ``superlink_args`` / ``node_args``. The
Flower CLI's configuration lives in the federation's own directory (``FLWR_HOME``), never in the
user's home. Used by ``pock-tvm fleet`` and the tests.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .records import require_flwr

APP = Path(__file__).with_name("flower_app")  # the Flower App directory ``flwr run`` sends


@dataclass(frozen=True)
class TLS:
    """Certificates for a federation that leaves this machine: the CA that signed the SuperLink's
    certificate (nodes and the CLI check it), and the SuperLink's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tool(name: str) -> str:
    """A Flower executable of this Python environment (beside the interpreter), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"'{name}' not found: install Flower (pip install -c constraints.txt -e '.[fleet]')")
    return found


def _wait_port(host: str, port: int, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{Path(process.args[0]).name} exited ({process.returncode}); its log "
                               f"{log}:\n{_tail(log)}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s; see {log}")


def _env(home: Path) -> dict:
    """The environment of Flower's processes: their own ``FLWR_HOME``, and this Python
    environment's executables first on ``PATH`` (the SuperLink and SuperNodes start
    ``flower-superexec`` and the apps by name)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "FLWR_HOME": str(home), "PATH": path}


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


@dataclass
class Federation:
    """``workdir``: logs, the Flower CLI's configuration; ``host``: the SuperLink's address
    (loopback by default; another one needs ``tls``)."""

    workdir: Path
    host: str = "127.0.0.1"
    tls: TLS | None = None
    superlink_args: list[str] = field(default_factory=list)
    node_args: list[str] = field(default_factory=list)
    port: int = 0
    nodes: dict[int, subprocess.Popen] = field(default_factory=dict)
    node_settings: dict[int, dict] = field(default_factory=dict)

    def __post_init__(self):
        require_flwr()
        self.workdir = Path(self.workdir)
        if self.tls is None and not _loopback(self.host):
            raise ValueError(f"a federation on {self.host} (not loopback) without TLS would send model tensors "
                             "in the clear: pass tls=TLS(ca_cert, server_cert, server_key) or bind 127.0.0.1")
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self._superlink: subprocess.Popen | None = None

    # ---- processes ------------------------------------------------------------------------
    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as f:  # its own session: stop() ends it with the apps it started
            return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=_env(self.workdir / "flwr"))

    def _security(self, node: bool) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        if node:
            return ["--root-certificates", str(self.tls.ca_cert)]
        return ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key)]

    def start(self, timeout: float = 60.0) -> Federation:
        """Start the SuperLink and wait until it listens."""
        self.port = self.port or free_port(self.host)
        log = self.workdir / "logs" / "superlink.log"
        self._superlink = self._spawn([_tool("flower-superlink"), *self._security(False), "--host", self.host,
                                       "--port", str(self.port), *self.superlink_args], log)
        _wait_port(self.host, self.port, timeout, self._superlink, log)
        return self

    def add_node(self, index: int, data: Path, bundle: Path | None = None, runner: Path | None = None,
                 timeout: float = 60.0) -> None:
        """Start SuperNode ``index`` holding ``data`` (its ``.npz``); ``bundle``: its own bundle;
        ``runner``: train and evaluate with this ``pock_runner`` on that bundle (a device node)."""
        config = {"partition-id": index, "data": str(Path(data).resolve()),
                  **({"bundle": str(Path(bundle).resolve())} if bundle else {}),
                  **({"runner": str(Path(runner).resolve())} if runner else {})}
        self.node_settings[index] = {"config": config, "port": free_port("127.0.0.1"), "timeout": timeout}
        self._start_node(index)

    def _start_node(self, index: int) -> None:
        settings = self.node_settings[index]
        log = self.workdir / "logs" / f"node{index}.log"
        node_config = " ".join(f"{k}={_toml_value(v)}" for k, v in settings["config"].items())
        self.nodes[index] = self._spawn([
            _tool("flower-supernode"), *self._security(True), "--superlink", f"{self.host}:{self.port}",
            "--host", "127.0.0.1", "--port", str(settings["port"]), "--node-config", node_config,
            *self.node_args], log)
        _wait_port("127.0.0.1", settings["port"], settings["timeout"], self.nodes[index], log)

    def kill_node(self, index: int) -> None:
        """Kill SuperNode ``index`` and the app it runs at once (SIGKILL: a device that dies)."""
        _kill_group(self.nodes.pop(index), signal.SIGKILL)

    def restart_node(self, index: int) -> None:
        """Start SuperNode ``index`` again, with its data (it rejoins the federation)."""
        self._start_node(index)

    def stop(self) -> None:
        for index in list(self.nodes):
            _kill_group(self.nodes.pop(index), signal.SIGTERM)
        if self._superlink is not None:
            _kill_group(self._superlink, signal.SIGTERM)
            self._superlink = None

    def __enter__(self) -> Federation:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()

    # ---- runs -----------------------------------------------------------------------------
    def run(self, bundle: Path, out: Path, timeout: float = 600.0, app: Path = APP, **settings) -> dict:
        """``flwr run`` pock_tvm's Flower App on this federation and wait for it to finish:
        the nodes fine-tune ``bundle``'s trained tensors, the server averages them (``settings``:
        the app's run settings, ``rounds=5, local_epochs=2``...; ``app``: another Flower App
        directory with the same settings). Returns ``out/federation.json``."""
        home = self.workdir / "flwr"
        home.mkdir(parents=True, exist_ok=True)
        address = f"{self.host}:{self.port}"
        connection = [f'address = "{address}"', "insecure = true" if self.tls is None
                      else f"root-certificates = {json.dumps(str(self.tls.ca_cert))}"]
        (home / "config.toml").write_text("[superlink]\ndefault = \"pock-tvm\"\n\n[superlink.pock-tvm]\n"
                                          + "\n".join(connection) + "\n")
        out = Path(out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        (out / "federation.json").unlink(missing_ok=True)
        config = {"bundle": str(Path(bundle).resolve()), "out": str(out),
                  **{k.replace("_", "-"): v for k, v in settings.items()}}
        log = self.workdir / "logs" / "run.log"
        with open(log, "ab") as f:
            done = subprocess.run([_tool("flwr"), "run", str(app), "pock-tvm", "--stream", "--run-config",
                                   " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())],
                                  stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env=_env(home))
        if done.returncode != 0 or not (out / "federation.json").exists():
            raise RuntimeError(f"the federated run failed (flwr run exited {done.returncode}); {log}:\n{_tail(log)}"
                               f"\nsuperlink log:\n{_tail(self.workdir / 'logs' / 'superlink.log', 15)}")
        return json.loads((out / "federation.json").read_text())


def _kill_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
