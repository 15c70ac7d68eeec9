"""Host runtime: run, inspect, save and load a compiled training step.

The submodules that need TVM (``program``) load on first use, so that the light ones (``spec``,
``checks``, ``layout``) serve the CLI's argument parsing without it.
"""

from __future__ import annotations

import importlib

_LAZY = {"Layout": ("layout", "Layout"), "RuntimeParam": ("layout", "RuntimeParam"), "Program": ("program", "Program")}

__all__ = ["Layout", "Program", "RuntimeParam"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pock_tvm.runtime' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value
