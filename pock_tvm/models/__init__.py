"""Reference models used by the demo, the tests and the benchmarks.

There is no CPU build of torchvision on the target machines, so the architectures pock_tvm is
measured on are defined here, with torchvision-compatible parameter names.
"""

from .digits_cnn import DigitsCNN
from .mlp import MLP
from .mobilenet_v2 import MobileNetV2
from .resnet import ResNet18
from .small_cnn import SmallCNN

__all__ = ["DigitsCNN", "MLP", "MobileNetV2", "ResNet18", "SmallCNN", "build"]

_REGISTRY = {
    "digitscnn": lambda: DigitsCNN(),
    "mlp": lambda: MLP(),
    "mobilenetv2": lambda: MobileNetV2(width_mult=0.35, num_classes=10),
    "resnet18": lambda: ResNet18(num_classes=10),
    "smallcnn": lambda: SmallCNN(),
}


# the input shape a reference model is compiled for when none is given
DEFAULT_INPUT_SHAPES = {"mlp": (8, 32), "digitscnn": (16, 1, 24, 24)}


def build(name: str):
    """Build a reference model by name (``digitscnn``, ``mlp``, ``mobilenetv2``, ``resnet18``, ``smallcnn``)."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(_REGISTRY)}") from None
