"""pock_tvm's caches on disk: where they live, and the compile cache of built training steps.

Everything here is safe to delete at any time between runs (``rm -rf ~/.cache/pock_tvm``): a
missing entry is rebuilt. ``POCK_TVM_CACHE`` moves the whole cache; ``POCK_TVM_COMPILE_CACHE=0``
switches the compile cache off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

# the compile cache keeps at most this many bytes of libraries; the least recently used go first
COMPILE_CACHE_BYTES = 2 << 30
# steps with more constant bytes (frozen weights folded in) are not cached: exporting and storing
# a library of that size costs more than the build it would save
MAX_CACHED_CONSTANT_BYTES = 256 << 20


def cache_dir() -> Path:
    """``$POCK_TVM_CACHE``, else ``$XDG_CACHE_HOME/pock_tvm`` (``~/.cache/pock_tvm``)."""
    if os.environ.get("POCK_TVM_CACHE"):
        return Path(os.environ["POCK_TVM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pock_tvm"


def compile_cache_enabled() -> bool:
    return os.environ.get("POCK_TVM_COMPILE_CACHE", "1") not in ("0", "", "false", "no")


def step_key(lowered, target) -> str | None:
    """Content address of a lowered step: its IR (kernels and VM functions as TVMScript, every
    constant's dtype, shape and bytes), the target, and the TVM and pock_tvm versions; any change
    to one of them is another key. None when the step's constants exceed
    :data:`MAX_CACHED_CONSTANT_BYTES`."""
    import numpy as np
    import tvm
    from tvm import relax

    from . import __version__
    from .passes.utils import byte_view, host_array

    constants = []
    for func in lowered.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: constants.append(e)
                                            if isinstance(e, tvm.ir.expr.GenericConst) else None)
    # tensor constants (other ones, dtypes and shapes, are written out in the script); a tensor
    # that several functions share (a folded weight in forward and train_step) is hashed once
    tensors, seen = [], {}
    for c in constants:
        value = c.value
        if not hasattr(value, "numpy"):
            continue
        where = (value.data_ptr(), tuple(value.shape), str(value.dtype))
        if where not in seen:
            seen[where] = len(seen)
            tensors.append(value)
        else:
            tensors.append(seen[where])
    unique = [t for t in tensors if not isinstance(t, int)]
    if sum(int(np.prod(t.shape)) * np.dtype(str(t.dtype)).itemsize for t in unique) > MAX_CACHED_CONSTANT_BYTES:
        return None  # decided from the shapes: the bytes of a large model are never read here
    digest = hashlib.sha256()
    for part in (lowered.script(show_meta=False), str(target), tvm.__version__, __version__):
        digest.update(part.encode())
        digest.update(b"\0")
    for tensor in tensors:
        if isinstance(tensor, int):
            digest.update(f"same as constant {tensor}".encode())
            continue
        array = host_array(tensor)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(byte_view(array))
    return digest.hexdigest()


def lookup(key: str) -> Path | None:
    """The cached library of ``key``, touched as just used; None if absent."""
    path = cache_dir() / "compiled" / f"{key}.so"
    if not path.is_file():
        return None
    os.utime(path)
    return path


def store(key: str, export) -> Path | None:
    """``export(file)`` writes the library; it lands under ``key`` atomically (a temporary file,
    then a rename), and the cache is trimmed to :data:`COMPILE_CACHE_BYTES`. Returns its path, or
    None when the cache cannot be written (read-only, disk full): compiling goes on without it."""
    folder = cache_dir() / "compiled"
    final = folder / f"{key}.so"
    tmp = folder / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp.so"  # (threads: build_many)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        export(tmp)
        os.replace(tmp, final)
    except OSError as err:
        logger.info("compile cache not written (%s); compiling goes on without it", err)
        tmp.unlink(missing_ok=True)
        return None
    _trim(folder, COMPILE_CACHE_BYTES, keep=final)
    return final


def _trim(folder: Path, limit: int, keep: Path) -> None:
    """Least recently used libraries out until ``folder`` holds ``limit`` bytes; ``keep`` (the one
    just written, about to be loaded) stays even when it alone is larger."""
    entries = []
    for path in folder.glob("*.so"):
        if path.name.startswith(".") or path == keep:  # another process's file being written; the new one
            continue
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries) + (keep.stat().st_size if keep.exists() else 0)
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        path.unlink(missing_ok=True)
        total -= size
