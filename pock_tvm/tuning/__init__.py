"""Tuning databases shipped with pock_tvm, one directory per host CPU (``<arch>-<llvm cpu>``), made by
``make tune-host`` (``pock-tvm tune`` on the reference models). ``compile(target="host")`` applies
the one for this CPU; another CPU gets the default schedules, and is told so once."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent


def host_cpu() -> str:
    """``x86_64-znver4``: the architecture and the CPU LLVM detects (its ISA features follow from it)."""
    from ..targets import host_arch
    from ..targets.toolchain import system_cpu

    return f"{host_arch()}-{system_cpu()}"


def shipped_database_dir() -> Path:
    """Where this CPU's shipped database lives (or would, for ``make tune-host``)."""
    return ROOT / host_cpu()


@functools.cache
def shipped_database() -> Path | None:
    """This CPU's shipped database, if there is one; says once when there is none."""
    path = shipped_database_dir()
    if (path / "database_workload.json").exists():
        logger.info("applying the shipped tuning database for %s", path.name)
        return path
    shipped = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("_"))
    logger.warning("no tuned kernel schedules ship for this CPU (%s; shipped: %s): default schedules are "
                   "used; `pock-tvm tune` makes a database for it", host_cpu(), ", ".join(shipped) or "none")
    return None
