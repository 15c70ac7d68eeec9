"""Deployment targets: presets as data, and the tools that build for them."""

from .presets import PRESETS, TargetPreset, host_arch, load_target

__all__ = ["PRESETS", "TargetPreset", "host_arch", "load_target"]
