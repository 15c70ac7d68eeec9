"""Deployment targets: presets as data, and the tools that build for them."""

from .presets import CONV_LAYOUTS, PRESETS, TargetPreset, host_arch, load_target

__all__ = ["CONV_LAYOUTS", "PRESETS", "TargetPreset", "host_arch", "load_target"]
