"""The deployment bundle: one directory that Python (``pock_tvm.load``) and the C++ device runner
both read. Format ``pock_tvm.bundle/1``:

- ``manifest.json``: inputs, target and output specs, the runtime tensors in call order, the
  scheme, optimizer, loss, the target preset, and the SHA-256 of every file it names.
- ``lib.so`` (``lib.dylib`` for macOS): the compiled ``train_step`` and ``forward`` (TVM Relax VM
  executable); frozen tensors folded into it are constants.
- ``params.bin``: every tensor of ``manifest["tensors"]`` as raw little-endian C-order bytes at its
  ``offset`` (``nbytes`` long): parameters (``role`` param; ``passed`` false for folded frozen ones,
  kept for the state dict), the step counter (``step``) and optimizer state (``state``).

``train_step(*inputs, *passed params, target, lr, step, *states)`` returns
``(loss, *new trainable params, new step, *new states)``. A writer commits a new state by writing
a new state file, then replacing ``manifest.json`` (atomic rename), then deleting the old file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

FORMAT = "pock_tvm.bundle/1"
MANIFEST = "manifest.json"
STATE = "params.bin"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_entries(layout, values: dict[str, np.ndarray]) -> list[tuple[dict, np.ndarray]]:
    """``(entry, array)`` in ``params.bin`` order: parameters, step, optimizer state."""
    out, offset = [], 0

    def add(name, role, array, passed=True, source=None):
        nonlocal offset
        array = np.asarray(array)
        entry = {"name": name, "role": role, "shape": list(array.shape), "dtype": str(array.dtype),
                 "offset": offset, "nbytes": int(array.nbytes), "passed": passed}
        if source is not None:
            entry["source"] = source
        out.append((entry, array))
        offset += int(array.nbytes)

    for p in layout.params:
        add(p.var, "param", values[p.var], not p.folded, p.source)
        out[-1][0]["trainable"] = p.trainable
    add("step", "step", np.asarray(values["step"], "float32"))
    for key in layout.state_keys():
        add(key, "state", values[key])
    return out


def write_state_file(path: Path, entries: list[tuple[dict, np.ndarray]]) -> None:
    with open(path, "wb") as f:
        for _, array in entries:
            f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())


def write_bundle(dest: Path, export_library: Callable[[Path], None], library: str, layout,
                 values: dict[str, np.ndarray], extra: dict) -> Path:
    """Write the whole bundle to a temporary directory, then swap it in (all or nothing)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be copied around
    try:
        export_library(tmp / library)
        entries = tensor_entries(layout, values)
        write_state_file(tmp / STATE, entries)
        manifest = {"format": FORMAT, "library": library, "state_file": STATE,
                    "tensors": [e for e, _ in entries], "layout": layout.to_json(), **extra,
                    "files": {library: sha256(tmp / library), STATE: sha256(tmp / STATE)}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def read_manifest(path: Path) -> dict:
    """The manifest of bundle ``path``, after checking that its files exist and match their hashes."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise ValueError(f"'{path}' has no {MANIFEST}; is it a bundle written by Program.save or "
                         "`pock-tvm compile -o`?")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"'{path}/{MANIFEST}' has format {manifest.get('format')!r}, expected {FORMAT!r}; "
                         "recompile the model with this version of pock_tvm")
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.exists():
            raise ValueError(f"bundle '{path}' is missing {name}, named in {MANIFEST}; copy the whole "
                             "bundle directory")
        if sha256(file) != digest:
            raise ValueError(f"bundle '{path}': {name} does not match its SHA-256 in {MANIFEST}; the file "
                             "was changed or truncated, copy the bundle again")
    return manifest


def read_state(path: Path, manifest: dict) -> dict[str, np.ndarray]:
    raw = (Path(path) / manifest["state_file"]).read_bytes()
    values = {}
    for e in manifest["tensors"]:
        dtype = np.dtype(e["dtype"]).newbyteorder("<")
        array = np.frombuffer(raw, dtype, count=int(np.prod(e["shape"], dtype=np.int64)), offset=e["offset"])
        values[e["name"]] = array.reshape(e["shape"]).astype(e["dtype"])
    return values


def _replace_dir(new: Path, dest: Path) -> None:
    """Move directory ``new`` to ``dest``; an existing ``dest`` is swapped out, then removed."""
    if not dest.exists():
        os.replace(new, dest)
        return
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def write_batches(path: Path, layout, inputs: list[np.ndarray], target: np.ndarray) -> int:
    """Write samples as the runner's data file: whole batches back to back, each the inputs then
    the target, raw little-endian C-order with the bundle's shapes and dtypes. A last partial
    batch is dropped. Returns the number of batches."""
    batch = layout.target.shape[0] if layout.target.shape else 1
    count = len(target) // batch
    if count == 0:
        raise ValueError(f"data has {len(target)} samples, fewer than one batch of {batch}")
    specs = [*layout.inputs, layout.target]
    with open(path, "wb") as f:
        for i in range(count):
            for array, spec in zip([*inputs, target], specs):
                part = np.asarray(array[i * batch:(i + 1) * batch])
                if tuple(part.shape) != tuple(spec.shape):
                    raise ValueError(f"'{spec.name}' batches have shape {part.shape}, the bundle expects "
                                     f"{tuple(spec.shape)}")
                f.write(part.astype(np.dtype(spec.dtype).newbyteorder("<")).tobytes())
    return count
