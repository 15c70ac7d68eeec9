"""Where ``pock-tvm tune`` builds and measures its candidate kernels: this machine, one RPC server
(``--rpc HOST:PORT``: ``pock_runner serve --allow-remote-code`` on a board without Python, or TVM's
``python -m tvm.exec.rpc_server``), or any free board of a tracker (``--tracker HOST:PORT --key
KEY``, TVM's ``python -m tvm.exec.rpc_tracker``: how a farm of boards is shared).

Candidates for another machine are compiled and linked here, with the target's cross compiler,
into shared libraries that the board loads: the board needs no compiler and no Python.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from ..targets.presets import TargetPreset
from ..tvmscript import import_tensor_intrinsics


@dataclass(frozen=True)
class TuningDevice:
    """``rpc``: ``HOST:PORT`` of one RPC server; ``tracker`` + ``key``: a tracker and the key its
    boards registered with; neither: this machine. ``timeout``: seconds one measurement may take
    (uploading and running a candidate on an emulated or slow board)."""

    rpc: str | None = None
    tracker: str | None = None
    key: str | None = None
    timeout: float = 120.0

    def __post_init__(self):
        if self.rpc and self.tracker:
            raise ValueError("tune: give either --rpc HOST:PORT (one device) or --tracker HOST:PORT "
                             "--key KEY (a board farm), not both")
        if self.tracker and not self.key:
            raise ValueError("tune: --tracker needs --key, the key the boards registered with "
                             "(`python -m tvm.exec.query_rpc_tracker` lists them)")
        if self.key and not self.tracker:
            raise ValueError("tune: --key names boards of a tracker; add --tracker HOST:PORT")
        for flag, value in (("--rpc", self.rpc), ("--tracker", self.tracker)):
            if value:
                parse_address(value, flag)
        if not self.timeout > 0:
            raise ValueError(f"tune: timeout must be a positive number of seconds, got {self.timeout}")

    @property
    def is_local(self) -> bool:
        return not (self.rpc or self.tracker)

    def describe(self) -> str:
        if self.rpc:
            return f"the RPC server at {self.rpc}"
        if self.tracker:
            return f"a '{self.key}' board of the tracker at {self.tracker}"
        return "this machine"

    def builder(self, preset: TargetPreset):
        """MetaSchedule builder: compiles here; for a remote device, links a shared library with
        the target's toolchain (the device loads it without a compiler)."""
        from tvm.s_tir import meta_schedule as ms

        workers = os.cpu_count() or 1
        if self.is_local:
            return ms.builder.LocalBuilder(timeout_sec=300, max_workers=workers, initializer=import_tensor_intrinsics)
        return ms.builder.LocalBuilder(timeout_sec=300, max_workers=workers, initializer=import_tensor_intrinsics,
                                       f_export=functools.partial(_export_shared, preset))

    def runner(self):
        """MetaSchedule runner measuring on this device."""
        from tvm.s_tir import meta_schedule as ms

        evaluator = _evaluator()
        if self.is_local:
            return ms.runner.LocalRunner(evaluator)
        host, port = parse_address(self.rpc or self.tracker, "--rpc" if self.rpc else "--tracker")
        # RPCConfig insists on tracker fields; with --rpc, _connect reaches the server directly
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=self.key or "direct",
                                     session_timeout_sec=int(self.timeout))
        create = functools.partial(_connect, host, port, int(self.timeout)) if self.rpc else None
        return ms.runner.RPCRunner(config, evaluator, f_create_session=create,
                                   f_alloc_argument=_alloc_arguments, max_workers=1)


    def measure(self, mod, target, builder, runner) -> float:
        """Seconds per call of kernel ``main`` of ``mod`` on random inputs, as MetaSchedule measures
        its candidates. On this machine the kernel is built and timed in this process, the way
        MetaSchedule's local builder and runner do it, without starting their worker processes
        (about 20 s a kernel on 2 cores); on a device, through ``builder`` and ``runner``."""
        if self.is_local:
            return _measure_here(mod, target)
        return _measure_with(mod, target, builder, runner)


def _evaluator():
    """How a candidate is timed: 3 calls a repeat, repeats of at least 20 ms (MetaSchedule's runner)."""
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20)


def _measure_here(mod, target) -> float:
    import tvm

    import_tensor_intrinsics()  # (default_build imports them)
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common, run_evaluator_common

    lib = default_build(mod, target, None)
    device = tvm.cpu()
    fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure", allow_missing=True)
    args_info = [a.as_json() for a in ms.arg_info.ArgInfo.from_prim_func(mod["main"])]
    args = alloc_argument_common(fill, device, args_info, 1)
    return float(np.mean(run_evaluator_common(lib, device, _evaluator(), args)))


def _measure_with(mod, target, builder, runner) -> float:
    from tvm.s_tir import meta_schedule as ms

    (built,) = builder.build([ms.builder.BuilderInput(mod, target)])
    if built.error_msg:
        raise ValueError(f"tune: building a kernel failed: {built.error_msg.splitlines()[0]}")
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    device_type = "cuda" if target.kind.name == "cuda" else "cpu"
    (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, device_type, args)])
    result = future.result()
    if result.error_msg:
        raise ValueError(f"tune: running a kernel failed: {result.error_msg.strip().splitlines()[-1]}")
    return float(np.mean([float(s) for s in result.run_secs]))


# -- run in MetaSchedule's worker processes (module-level, so they pickle) --

def _export_shared(preset: TargetPreset, module) -> str:
    from ..targets.toolchain import exporter

    path = os.path.join(tempfile.mkdtemp(prefix="pock_tune_"), f"candidate.{preset.export_format}")
    exporter(preset)(module, path)
    return path


def _connect(host: str, port: int, timeout: int, _config):
    from tvm import rpc

    return rpc.connect(host, port, session_timeout=timeout)


def _alloc_arguments(session, device, args_info, alloc_repeat):
    """Random inputs sent from here: a board's runtime need not have TVM's random contrib."""
    import tvm

    rng = np.random.default_rng(0)
    out = []
    for _ in range(alloc_repeat):
        args = []
        for kind, dtype, shape in args_info:
            if kind != "TENSOR":
                raise ValueError(f"tune: cannot make an argument of kind {kind!r}")
            value = (rng.standard_normal(shape) if "float" in dtype else np.zeros(shape)).astype(dtype)
            args.append(tvm.runtime.tensor(value, device))
        out.append(args)
    return out


def parse_address(text: str, flag: str = "--rpc") -> tuple[str, int]:
    """``HOST:PORT`` as ``(host, port)``; a clear error naming ``flag`` otherwise."""
    host, _, port = str(text).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag} expects HOST:PORT, got {text!r} (e.g. 192.168.1.20:9090)")
    return host, int(port)
