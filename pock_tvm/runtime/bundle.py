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
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .. import calling

FORMAT = "pock_tvm.bundle/1"
MANIFEST = "manifest.json"
STATE = "params.bin"
LOCK = ".lock"
DTYPES = ("float32", "float64", "float16", "int64", "int32", "int8", "uint8")
ROLES = ("param", "step", "state")
LIBRARY_SUFFIXES = (".so", ".dylib")
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
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    check_replaceable(dest, force)
    tmp = Path(tempfile.mkdtemp(prefix=_sibling(dest, "tmp"), dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be copied around
    try:
        export_library(tmp / library)
        write_state_file(tmp / STATE, entries)
        manifest = {"format": FORMAT, "library": library, "state_file": STATE,
                    "tensors": [e for e, _ in entries], "layout": layout.to_json(),
                    "calling": layout.signatures(), **extra,
                    "files": {library: sha256(tmp / library), STATE: sha256(tmp / STATE)}}
        _write_durably(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        with (locked(dest, "save") if dest.is_dir() else contextlib.nullcontext()):
            _replace_dir(tmp, dest)
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


def _is_bundle(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator:
    """A binary file that replaces ``path`` only once it is completely written and synced; on any
    error the old file stays and no temporary is left behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---- swapping, locking, leftovers ------------------------------------------------------------
def _sibling(dest: Path, kind: str) -> str:
    """Name prefix of a temporary sibling of ``dest``; the pid tells whether its writer still runs."""
    return f".{dest.name}.pock-{kind}-{os.getpid()}-"


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot swap '{a}' and '{b}': {os.strerror(err)}")


def _replace_dir(new: Path, dest: Path) -> None:
    """Move directory ``new`` to ``dest``; an existing ``dest`` is swapped out atomically, then removed
    (``new`` then holds the old content). Without ``renameat2`` two renames are used, and a crash
    between them is repaired by :func:`recover` on the next open."""
    if not dest.exists():
        os.replace(new, dest)
        return
    if _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)
        return
    old = dest.with_name(_sibling(dest, "old") + "0")
    os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def _writer_alive(name: str) -> bool:
    match = re.search(r"\.pock-(?:tmp|old)-(\d+)-", name)
    if not match:
        return True
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(dest: Path) -> None:
    """Clean what a killed writer of ``dest`` left beside it: a missing bundle comes back from its
    swapped-out copy, temporary directories of dead writers are removed."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return
    for leftover in dest.parent.glob(f".{glob_escape(dest.name)}.pock-*"):
        if _writer_alive(leftover.name):
            continue
        if ".pock-old-" in leftover.name and not dest.exists() and _is_bundle(leftover):
            os.replace(leftover, dest)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


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


_held: dict[str, int] = {}


@contextlib.contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """Hold the bundle's exclusive lock (``flock`` of ``path/.lock``, as the runner takes it);
    re-entrant within one process. A bundle locked elsewhere is an error, not a wait."""
    key = str(Path(path).resolve())
    if key in _held:
        yield
        return
    fd = os.open(Path(path) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{what}: bundle '{path}' is in use by another process (a runner or pock-tvm "
                             "training it); wait until it finishes, or copy the bundle") from None
        _held[key] = fd
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)


# ---- reading ---------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict:
    """The manifest of bundle ``path``, after :func:`check_manifest` and checking that every file
    it names exists and matches its hash."""
    path = Path(path)
    recover(path)
    if not (path / MANIFEST).exists():
        raise ValueError(f"'{path}' has no {MANIFEST}; is it a bundle written by Program.save or "
                         "`pock-tvm compile -o`?")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"'{path}/{MANIFEST}' is not valid JSON ({err}); copy the bundle again") from None
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
    size = (path / manifest["state_file"]).stat().st_size
    for i, e in enumerate(manifest["tensors"]):
        if e["offset"] + e["nbytes"] > size:
            raise ValueError(f"'{path}/{MANIFEST}': tensors[{i}] ('{e['name']}') ends at byte "
                             f"{e['offset'] + e['nbytes']}, past the end of {manifest['state_file']} ({size} "
                             "bytes); the bundle is damaged, copy it again")
    return manifest


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


class _Bad(ValueError):
    pass


def check_manifest(m: dict, where: str = MANIFEST) -> None:
    """Validate every field a reader relies on; one :class:`ValueError` naming the field and the fix."""
    try:
        _check_manifest(m)
    except _Bad as err:
        raise ValueError(f"{where}: {err}; the bundle is damaged or was edited by hand, write it again "
                         "with `pock-tvm compile -o` or Program.save") from None


def _field(obj, key, kind, where):
    if not isinstance(obj, dict) or key not in obj:
        raise _Bad(f"'{where}{key}' is missing")
    value = obj[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)) or \
            kind is not int and not isinstance(value, kind):
        raise _Bad(f"'{where}{key}' must be {getattr(kind, '__name__', kind)}, got {value!r}"[:300])
    return value


def plain_name(name, where: str) -> str:
    """A file name inside the bundle: no directory part, no ``..``, not hidden."""
    if not isinstance(name, str) or not name or name != os.path.basename(name) or "\\" in name \
            or name.startswith(".") or "\0" in name:
        raise _Bad(f"'{where}' must be a plain file name inside the bundle, got {name!r}")
    return name


def _check_manifest(m: dict) -> None:
    files = _field(m, "files", dict, "")
    for name, digest in files.items():
        plain_name(name, f"files[{name!r}]")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise _Bad(f"'files[{name!r}]' must be a SHA-256 hex digest")
    for key in ("library", "state_file"):
        name = plain_name(_field(m, key, str, ""), key)
        if name not in files:
            raise _Bad(f"'{key}' ({name}) is not listed in 'files', so it cannot be verified")
    if not m["library"].endswith(LIBRARY_SUFFIXES):
        raise _Bad(f"'library' must end in {' or '.join(LIBRARY_SUFFIXES)}, got {m['library']!r}")
    target = _field(m, "target", dict, "")
    for key in ("name", "arch", "os", "device"):
        _field(target, key, str, "target.")
    tensors = _field(m, "tensors", list, "")
    names = set()
    for i, e in enumerate(tensors):
        at = f"tensors[{i}]."
        name = _field(e, "name", str, at)
        if name in names:
            raise _Bad(f"'{at}name' ({name}) is used twice")
        names.add(name)
        if _field(e, "role", str, at) not in ROLES:
            raise _Bad(f"'{at}role' must be one of {ROLES}, got {e['role']!r}")
        shape = _field(e, "shape", list, at)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 or d > 1 << 40 for d in shape) \
                or len(shape) > 8:
            raise _Bad(f"'{at}shape' must be at most 8 non-negative integers, got {shape!r}"[:300])
        if _field(e, "dtype", str, at) not in DTYPES:
            raise _Bad(f"'{at}dtype' must be one of {DTYPES}, got {e['dtype']!r}")
        offset, nbytes = _field(e, "offset", int, at), _field(e, "nbytes", int, at)
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(e["dtype"]).itemsize
        if offset < 0 or nbytes != want:
            raise _Bad(f"'{at}offset' must be >= 0 and '{at}nbytes' equal {want} (shape {shape}, {e['dtype']}); "
                       f"got offset {offset}, nbytes {nbytes}")
        _field(e, "passed", bool, at)
        if "trainable" in e:
            _field(e, "trainable", bool, at)
    steps = [e for e in tensors if e["role"] == "step"]
    if len(steps) != 1 or steps[0]["shape"] != [] or steps[0]["dtype"] != "float32":
        raise _Bad("'tensors' must hold exactly one float32 scalar with role 'step'")
    layout = _layout(m)
    by_name = {e["name"]: e for e in tensors}
    for p in layout.params:
        e = by_name.get(p.var)
        if e is None or e["role"] != "param" or tuple(e["shape"]) != tuple(p.shape) or e["dtype"] != p.dtype \
                or e["passed"] == p.folded or bool(e.get("trainable")) != p.trainable:
            raise _Bad(f"'tensors' and 'layout.params' disagree about parameter '{p.var}'")
    for key in layout.state_keys():
        if by_name.get(key, {}).get("role") != "state":
            raise _Bad(f"optimizer state '{key}' of the layout is not among 'tensors'")
    if len(tensors) != len(layout.params) + 1 + len(layout.state_keys()):
        raise _Bad("'tensors' holds entries the layout does not name")
    if m.get("calling") != layout.signatures():
        raise _Bad("'calling' does not match the layout (argument order of train_step/forward)")


def _layout(m: dict):
    from .layout import Layout

    try:
        return Layout.from_json(_field(m, "layout", dict, ""))
    except _Bad:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise _Bad(f"'layout' is malformed ({type(err).__name__}: {err})"[:300]) from None


def write_batches(path: Path, layout, inputs: list[np.ndarray], target: np.ndarray) -> int:
    """Write samples as the runner's data file: whole batches back to back, each the inputs then
    the target, raw little-endian C-order with the bundle's shapes and dtypes. A last partial
    batch is dropped; labels are checked against the model's classes; the file is replaced
    atomically. Returns the number of batches."""
    batch = layout.target.shape[0] if layout.target.shape else 1
    count = len(target) // batch
    if count == 0:
        raise ValueError(f"data has {len(target)} samples, fewer than one batch of {batch}")
    layout.check_target(np.asarray(target[:count * batch]), "pack-data")
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
