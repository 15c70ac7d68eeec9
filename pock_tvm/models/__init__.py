"""Reference models used by the demo, the tests and the benchmarks.

There is no CPU build of torchvision on the target machines, so the architectures pock_tvm is
measured on are defined here, with torchvision-compatible parameter names. The classes are imported
when first used (``from pock_tvm.models import MobileNetV2``), so reading the registry (the CLI's
help) does not import torch.
"""

from __future__ import annotations

import importlib

# class name -> its module in this package
_CLASSES = {"DigitsCNN": "digits_cnn", "MLP": "mlp", "MobileNetV2": "mobilenet_v2", "ResNet18": "resnet",
            "SmallCNN": "small_cnn"}

# reference model name (CLI and build()) -> (class name, constructor arguments)
REGISTRY = {
    "digitscnn": ("DigitsCNN", {}),
    "mlp": ("MLP", {}),
    "mobilenetv2": ("MobileNetV2", {"width_mult": 0.35, "num_classes": 10}),
    "resnet18": ("ResNet18", {"num_classes": 10}),
    "smallcnn": ("SmallCNN", {}),
}
MODEL_NAMES = tuple(REGISTRY)

# the input shape a reference model is compiled for when none is given
DEFAULT_INPUT_SHAPES = {"mlp": (8, 32), "digitscnn": (16, 1, 24, 24)}

__all__ = ["DEFAULT_INPUT_SHAPES", "DigitsCNN", "MLP", "MODEL_NAMES", "MobileNetV2", "REGISTRY", "ResNet18",
           "SmallCNN", "build"]


def __getattr__(name: str):
    if name in _CLASSES:
        return getattr(importlib.import_module(f".{_CLASSES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build(name: str):
    """Build a reference model by name (one of :data:`MODEL_NAMES`)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(REGISTRY)}")
    cls, kwargs = REGISTRY[name]
    return __getattr__(cls)(**kwargs)
