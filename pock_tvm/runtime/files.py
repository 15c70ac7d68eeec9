"""Atomic and exclusive file operations: a file or directory replaced all at once, a directory's
lock, and the cleanup of what a killed writer left beside it.

Temporary siblings are named ``.<name>.pock-<kind>-<pid>-...``: the pid tells whether their writer
still runs, so a cleanup never removes the work of a live process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK = ".lock"


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


def write_json(path: Path, data) -> None:
    """``data`` as indented JSON at ``path``, replaced atomically (see :func:`atomic_file`)."""
    import json

    with atomic_file(Path(path)) as f:
        f.write((json.dumps(data, indent=1) + "\n").encode())


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sibling(dest: Path, kind: str) -> str:
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


def replace_dir(new: Path, dest: Path) -> None:
    """Move directory ``new`` to ``dest``; an existing ``dest`` is swapped out atomically, then removed
    (``new`` then holds the old content). Without ``renameat2`` two renames are used, and a crash
    between them is repaired by :func:`recover` on the next open."""
    if not dest.exists():
        os.replace(new, dest)
        return
    if _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)
        return
    old = dest.with_name(sibling(dest, "old") + "0")
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


def recover(dest: Path, is_complete: Callable[[Path], bool]) -> None:
    """Clean what a killed writer of ``dest`` left beside it: a missing ``dest`` comes back from its
    swapped-out copy (if ``is_complete`` says it is whole), temporaries of dead writers are removed."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return
    for leftover in dest.parent.glob(f".{glob_escape(dest.name)}.pock-*"):
        if _writer_alive(leftover.name):
            continue
        if ".pock-old-" in leftover.name and not dest.exists() and is_complete(leftover):
            os.replace(leftover, dest)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


_held: dict[str, int] = {}


@contextlib.contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """Hold directory ``path``'s exclusive lock (``flock`` of ``path/.lock``, as the C++ runner takes
    it for a bundle); re-entrant within one process. A lock held elsewhere is an error, not a wait."""
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


def writable_file(path: str | Path, what: str) -> Path:
    """``path`` if a file can be written there: not a directory, and its parent a directory (made
    if missing); a clear error naming ``what`` (the option) otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: '{path}' is a directory; give a file name inside it")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{what}: '{parent}' is a file, not a directory")
    return path
