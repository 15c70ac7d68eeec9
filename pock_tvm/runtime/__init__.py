"""Host runtime: run, inspect, save and load a compiled training step."""

from .layout import Layout, RuntimeParam
from .program import Program

__all__ = ["Layout", "Program", "RuntimeParam"]
