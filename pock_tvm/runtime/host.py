"""This machine, as bundles name targets."""

from __future__ import annotations

import platform


def host_arch() -> str:
    """``x86_64`` or ``aarch64`` (as ``uname -m`` says on Linux; macOS's ``arm64`` is ``aarch64``)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
