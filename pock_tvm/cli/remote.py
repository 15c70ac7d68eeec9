"""Run and time a bundle's training step on a device over TVM RPC.

The device runs a TVM RPC server: TVM's own (``python -m tvm.exec.rpc_server``) or, with no
Python on the board, ``pock_runner serve`` (same protocol, so TVM's client and tracker work).
The host uploads the library, keeps parameters and optimizer state on the device between steps,
and reads back only the loss; ``train_step`` is called through the VM's flat
``set_input``/``invoke_stateful``/``get_outputs`` interface, which RPC carries well.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .. import calling
from ..runtime.checks import check_lr
from ..runtime.bundle import read_manifest, read_state
from ..compiler.tuning_device import parse_address
from ..runtime.layout import Layout

logger = logging.getLogger(__name__)


def read_batches(path: str | Path, layout: Layout) -> list[list[np.ndarray]]:
    """The runner's data file as ``[[*inputs, target], ...]`` (see ``bundle.write_batches``)."""
    raw = Path(path).read_bytes()
    specs = [*layout.inputs, layout.target]
    sizes = [int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in specs]
    batch = sum(sizes)
    if not raw or len(raw) % batch:
        raise ValueError(f"data file '{path}' has {len(raw)} bytes, not a whole number of batches of "
                         f"{batch} bytes; write it with `pock-tvm pack-data`")
    out = []
    for start in range(0, len(raw), batch):
        arrays, offset = [], start
        for spec, size in zip(specs, sizes):
            arrays.append(np.frombuffer(raw, spec.dtype, int(np.prod(spec.shape, dtype=np.int64)), offset)
                          .reshape(spec.shape))
            offset += size
        layout.check_target(arrays[-1], f"data file '{path}'")
        out.append(arrays)
    return out


def run_remote(bundle: str | Path, data: str | Path, address: str, steps: int = 0,
               lr: float | None = None) -> list[dict]:
    """Upload ``bundle`` to the RPC server at ``HOST:PORT``, run ``steps`` training steps (default:
    one per batch of ``data``) and return ``[{"step", "loss", "time_ms"}, ...]``. Nothing is
    written back to the bundle."""
    import tvm
    from tvm import rpc
    from tvm.runtime import vm as rvm

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    layout = Layout.from_json(manifest["layout"])
    host, port = parse_address(address)
    try:
        remote = rpc.connect(host, port)
    except Exception as err:  # noqa: BLE001 -- any connection failure gets the same advice
        raise ValueError(f"cannot reach an RPC server at {address} ({err}); start one on the device: "
                         "`pock_runner serve --port PORT` or `python -m tvm.exec.rpc_server`") from None
    remote.upload(str(bundle / manifest["library"]))
    lib = remote.load_module(manifest["library"])
    dev = remote.cuda(0) if manifest["target"]["device"] == "cuda" else remote.cpu(0)
    vm = rvm.VirtualMachine(lib, dev)
    values = read_state(bundle, manifest)

    def put(array):
        return tvm.runtime.tensor(np.array(array, order="C"), dev)  # keeps 0-d scalars 0-d

    call = manifest["calling"]["train_step"]
    live = {t["name"]: put(values[t["name"]]) for t in manifest["tensors"] if t["passed"]}
    live[calling.LR] = put(np.asarray(check_lr(lr if lr is not None else layout.optimizer.get("lr", 0.01)),
                                      "float32"))
    batches = read_batches(data, layout)
    specs = [s.name for s in [*layout.inputs, layout.target]]
    rows = []
    for i in range(steps or len(batches)):
        live.update(zip(specs, (put(a) for a in batches[i % len(batches)])))
        vm.set_input("train_step", *[live[n] for n in call["args"]])
        start = time.perf_counter()
        vm.invoke_stateful("train_step")
        out = vm.get_outputs("train_step")
        named = dict(zip(call["outputs"], out))
        loss = float(named.pop(calling.LOSS).numpy())  # the round trip waits for the step
        elapsed = 1e3 * (time.perf_counter() - start)
        live.update(named)
        rows.append({"step": i + 1, "loss": loss, "time_ms": elapsed})
        logger.info("remote step %d loss %.6f time %.1f ms", i + 1, loss, elapsed)
    return rows
