"""Tuning databases shipped with pock_tvm, one directory per host vector ISA (``<arch>-<isa>``,
e.g. ``x86_64-avx512f``), made by ``make tune-host`` (``pock-tvm tune`` on the reference models).
``compile(target="host")`` applies the one for this CPU's ISA (the schedules are made for its vector
width: a database tuned on one AVX-512 CPU serves another); a CPU without one gets the default
schedules, and is told so once."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent


# per architecture, the vector extensions a database is made for, widest first (LLVM feature names)
VECTOR_ISAS = {"x86_64": ("avx512f", "avx2", "sse2"), "aarch64": ("sve", "neon")}


def host_isa() -> str:
    """``x86_64-avx512f``: the architecture and the widest vector extension of the CPU LLVM detects."""
    from ..targets import host_arch
    from ..targets.toolchain import system_cpu_features

    features = system_cpu_features()
    arch = host_arch()
    return f"{arch}-{next((f for f in VECTOR_ISAS.get(arch, ()) if f in features), 'generic')}"


def shipped_database_dir() -> Path:
    """Where the shipped database for this CPU's ISA lives (or would, for ``make tune-host``)."""
    return ROOT / host_isa()


@functools.cache
def shipped_database() -> Path | None:
    """This CPU's shipped database, if there is one; says once when there is none."""
    path = shipped_database_dir()
    if (path / "database_workload.json").exists():
        logger.info("applying the shipped tuning database for %s", path.name)
        return path
    shipped = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("_"))
    logger.warning("no tuned kernel schedules ship for this CPU (%s; shipped: %s): default schedules are "
                   "used; `pock-tvm tune` makes a database for it", host_isa(), ", ".join(shipped) or "none")
    return None
