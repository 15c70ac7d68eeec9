"""The deployment bundle: one directory that Python (``pock_tvm.load``) and the C++ device runner
both read. Format ``pock_tvm.bundle/1``:

- ``manifest.json``: inputs, target and output specs, the runtime tensors, the argument and output
  names of ``train_step`` and ``forward`` (``calling``, see :mod:`pock_tvm.calling`), the scheme,
  optimizer, loss, the target preset, and the SHA-256 of every file it names.
- ``lib.so`` (``lib.dylib`` for macOS): the compiled ``train_step`` and ``forward`` (TVM Relax VM
  executable); frozen tensors folded into it are constants.
- ``params.bin``: every tensor of ``manifest["tensors"]`` as raw little-endian C-order bytes at its
  ``offset`` (``nbytes`` long): parameters (``role`` param; ``passed`` false for folded frozen ones,
  kept for the state dict), the step counter (``step``) and optimizer state (``state``).

Trust: a manifest is checked before anything it says is used (:func:`check_manifest`): every
file it names is a plain name inside the bundle and matches its SHA-256, every tensor lies inside
the state file with the size its shape and dtype give, and the tensors agree with the layout and
the calling convention. The runner makes the same checks.

Writers: whoever changes a bundle holds an exclusive ``flock`` on its ``.lock`` file (the runner
too), so two trainers cannot lose each other's steps. A new state is committed by writing a new
state file, then replacing ``manifest.json`` (atomic rename), then deleting the old file; a whole
bundle is written to a temporary sibling directory and swapped in atomically (``renameat2``
``RENAME_EXCHANGE`` on Linux). Leftovers of a killed writer are cleaned on the next open.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import calling
from .files import LOCK, atomic_file, locked, recover, replace_dir, sibling, write_durably
from .manifest import check_manifest

FORMAT = "pock_tvm.bundle/1"
MANIFEST = "manifest.json"
STATE = "params.bin"
# leftovers of a killed writer: the runner's temporary files, and state files no manifest names
_RUNNER_LEFTOVER = re.compile(r"^(params\..*\.bin(\.tmp)?|manifest\.json\.tmp)$")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- writing ---------------------------------------------------------------------------------
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
    add(calling.STEP, "step", np.asarray(values[calling.STEP], "float32"))
    for key in layout.state_keys():
        add(key, "state", values[key])
    return out


def check_finite(entries: list[tuple[dict, np.ndarray]], where: str) -> None:
    """Refuse NaN or infinite values: a diverged training must not overwrite good weights."""
    bad = []
    for entry, array in entries:
        if array.dtype.kind == "f":
            count = int(array.size - np.count_nonzero(np.isfinite(array)))
            if count:
                bad.append(f"'{entry.get('source', entry['name'])}' ({entry['name']}) has {count} of {array.size}")
    if bad:
        raise ValueError(f"{where}: non-finite values (NaN or inf) in the state, nothing was written: "
                         f"{'; '.join(bad[:5])}. Training diverged: lower the learning rate and train "
                         "again from the last saved bundle")


def write_state_file(path: Path, entries: list[tuple[dict, np.ndarray]]) -> None:
    with open(path, "wb") as f:
        for _, array in entries:
            f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())


def write_bundle(dest: Path, export_library: Callable[[Path], None], library: str, layout,
                 values: dict[str, np.ndarray], extra: dict, force: bool = False) -> Path:
    """Write the whole bundle to a temporary directory, then swap it in (all or nothing).

    ``dest`` may be missing, empty or a bundle (replaced); any other directory or file is refused
    unless ``force``. Non-finite values are refused before anything is written."""
    dest = Path(dest)
    entries = tensor_entries(layout, values)
    check_finite(entries, "save")
    for parent in [dest.parent, *dest.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"cannot write the bundle '{dest}': '{parent}' is a file, not a directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest, _is_bundle)
    check_replaceable(dest, force)
    tmp = Path(tempfile.mkdtemp(prefix=sibling(dest, "tmp"), dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be copied around
    try:
        export_library(tmp / library)
        write_state_file(tmp / STATE, entries)
        manifest = {"format": FORMAT, "library": library, "state_file": STATE,
                    "tensors": [e for e, _ in entries], "layout": layout.to_json(),
                    "calling": layout.signatures(), **extra,
                    "files": {library: sha256(tmp / library), STATE: sha256(tmp / STATE)}}
        write_durably(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        with (locked(dest, "save") if dest.is_dir() else contextlib.nullcontext()):
            replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def check_replaceable(dest: Path, force: bool) -> None:
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_dir() and not dest.is_symlink():
        content = sorted(p.name for p in dest.iterdir() if p.name != LOCK)
        if not content or _is_bundle(dest) or force:
            return
        shown = ", ".join(content[:5]) + (", ..." if len(content) > 5 else "")
        raise ValueError(f"save: '{dest}' is a directory that is not a pock_tvm bundle (it holds {shown}); "
                         "nothing was written. Choose a new path, or pass force=True (`--force`) to replace "
                         "the directory and everything in it")
    if not force:
        raise ValueError(f"save: '{dest}' exists and is not a directory; nothing was written. Choose a new "
                         "path, or pass force=True (`--force`) to replace it")
    dest.unlink()


def update_state(path: Path, values: dict[str, np.ndarray]) -> None:
    """Replace tensors of bundle ``path``'s state (by manifest name: a parameter's runtime name, the
    step counter, optimizer state), committed as the runner commits its steps: a new state file,
    then ``manifest.json`` (atomic), then the old state file removed; under the bundle's lock.
    Unknown names, other shapes and non-finite values are refused before anything is written."""
    path = Path(path)
    with locked(path, "update"):
        manifest = read_manifest(path)
        state = read_state(path, manifest)
        unknown = sorted(set(values) - set(state))
        if unknown:
            raise ValueError(f"update: bundle '{path}' has no tensors {unknown[:5]}")
        entries = []
        for e in manifest["tensors"]:
            value = np.asarray(values[e["name"]]) if e["name"] in values else state[e["name"]]
            if tuple(value.shape) != tuple(e["shape"]):
                raise ValueError(f"update: '{e['name']}' has shape {tuple(value.shape)}, the bundle {tuple(e['shape'])}")
            entries.append((e, value.astype(e["dtype"], copy=False)))
        check_finite(entries, "update")
        old = manifest["state_file"]
        new = f"params.{os.getpid()}.{uuid.uuid4().hex[:8]}.bin"  # a runner leftover's name if this dies
        write_state_file(path / new, entries)
        files = {k: v for k, v in manifest["files"].items() if k != old}
        files[new] = sha256(path / new)
        with atomic_file(path / MANIFEST) as f:
            f.write(json.dumps({**manifest, "state_file": new, "files": files}, indent=1).encode())
        if old != new:
            (path / old).unlink(missing_ok=True)


def _is_bundle(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def clean_state_leftovers(path: Path, manifest: dict) -> list[str]:
    """Remove the runner's temporary files and state files no longer named by the manifest (a kill
    between committing a new state and deleting the old one). Call with the bundle locked."""
    keep = set(manifest["files"])
    removed = []
    for f in Path(path).iterdir():
        if f.is_file() and f.name not in keep and _RUNNER_LEFTOVER.match(f.name):
            f.unlink()
            removed.append(f.name)
    return removed


# ---- reading ---------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict:
    """The manifest of bundle ``path``, after :func:`check_manifest` and checking that every file
    it names exists and matches its hash."""
    path = Path(path)
    recover(path, _is_bundle)
    if not (path / MANIFEST).exists():
        raise ValueError(f"'{path}' has no {MANIFEST}; is it a bundle written by Program.save or "
                         "`pock-tvm compile -o`?")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        why = "it nests too deep" if isinstance(err, RecursionError) else str(err)
        raise ValueError(f"'{path}/{MANIFEST}' is not valid JSON ({why}); copy the bundle again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"'{path}/{MANIFEST}' has format {found!r}, expected {FORMAT!r}; "
                         "recompile the model with this version of pock_tvm")
    check_manifest(manifest, f"'{path}/{MANIFEST}'")
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"bundle '{path}' is missing {name}, named in {MANIFEST}; copy the whole "
                             "bundle directory")
        if sha256(file) != digest:
            raise ValueError(f"bundle '{path}': {name} does not match its SHA-256 in {MANIFEST}; the file "
                             "was changed or truncated, copy the bundle again")
    check_library_complete(path / manifest["library"])
    size = (path / manifest["state_file"]).stat().st_size
    for i, e in enumerate(manifest["tensors"]):
        if e["offset"] + e["nbytes"] > size:
            raise ValueError(f"'{path}/{MANIFEST}': tensors[{i}] ('{e['name']}') ends at byte "
                             f"{e['offset'] + e['nbytes']}, past the end of {manifest['state_file']} ({size} "
                             "bytes); the bundle is damaged, copy it again")
    return manifest


def check_library_complete(path: Path) -> None:
    """Refuse an ELF library whose headers, segments or sections reach past the end of the file (a
    truncated copy whose hash was recomputed): the loader would fault (SIGBUS) mapping it. Other
    formats (Mach-O, tar) are left to their loader. The runner makes the same check."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF":
        return

    def bad(why: str):
        raise ValueError(f"library '{path}' is damaged ({why}); copy the bundle again or recompile")

    if len(data) < 64 or data[4] != 2:
        bad("not a complete 64-bit ELF header")
    size = len(data)
    phoff, shoff = (int.from_bytes(data[at:at + 8], "little") for at in (32, 40))
    phentsize, phnum, shentsize, shnum = (int.from_bytes(data[at:at + 2], "little") for at in (54, 56, 58, 60))
    if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size:
        bad("its headers lie past the end of the file")
    for i in range(phnum):
        at = phoff + i * phentsize
        offset, filesz = (int.from_bytes(data[at + k:at + k + 8], "little") for k in (8, 32))
        if offset + filesz > size:
            bad("a segment lies past the end of the file")
    for i in range(shnum):
        at = shoff + i * shentsize
        kind = int.from_bytes(data[at + 4:at + 8], "little")
        offset, length = (int.from_bytes(data[at + k:at + k + 8], "little") for k in (24, 32))
        if kind != 8 and offset + length > size:  # 8: SHT_NOBITS (.bss) takes no bytes in the file
            bad("a section lies past the end of the file")


def read_state(path: Path, manifest: dict) -> dict[str, np.ndarray]:
    """Every tensor of a manifest read by :func:`read_manifest` (which checked the offsets)."""
    raw = (Path(path) / manifest["state_file"]).read_bytes()
    values = {}
    for e in manifest["tensors"]:
        dtype = np.dtype(e["dtype"]).newbyteorder("<")
        count = int(np.prod(e["shape"], dtype=np.int64))
        if e["offset"] + count * dtype.itemsize > len(raw):
            raise ValueError(f"'{e['name']}' lies past the end of {manifest['state_file']}; copy the bundle again")
        array = np.frombuffer(raw, dtype, count=count, offset=e["offset"])
        values[e["name"]] = array.reshape(e["shape"]).astype(e["dtype"])
    return values


def write_batches(path: Path, layout, inputs: list[np.ndarray], target: np.ndarray) -> int:
    """Write samples as the runner's data file: whole batches back to back, each the inputs then
    the target, raw little-endian C-order with the bundle's shapes and dtypes. A last partial
    batch is dropped; labels are checked against the model's classes, token ids against the
    vocabulary; the file is replaced
    atomically. Returns the number of batches."""
    batch = layout.target.shape[0] if layout.target.shape else 1
    count = len(target) // batch
    if count == 0:
        raise ValueError(f"data has {len(target)} samples, fewer than one batch of {batch}")
    layout.check_target(np.asarray(target[:count * batch]), "pack-data")
    for array, spec in zip(inputs, layout.inputs):
        spec.check_values(np.asarray(array[:count * batch]), "pack-data")
    specs = [*layout.inputs, layout.target]
    with atomic_file(Path(path)) as f:
        for i in range(count):
            for array, spec in zip([*inputs, target], specs):
                part = np.asarray(array[i * batch:(i + 1) * batch])
                if tuple(part.shape) != tuple(spec.shape):
                    raise ValueError(f"'{spec.name}' batches have shape {part.shape}, the bundle expects "
                                     f"{tuple(spec.shape)}")
                f.write(part.astype(np.dtype(spec.dtype).newbyteorder("<")).tobytes())
    return count
