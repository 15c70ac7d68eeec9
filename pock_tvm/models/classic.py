"""The classic CNNs of the ONNX model zoo, small: the structure that trips importers and autodiff
(LRN and grouped convs as AlexNet's, flattening through shape arithmetic as VGG's, fire modules and a
conv classifier as SqueezeNet's, branches with pooling as Inception's, a Caffe2-converted ResNet with
a softmax head), at widths that compile in seconds. Inputs are Nx3x32x32, 10 classes."""

from __future__ import annotations

import torch
from torch import nn

CLASSES = 10


def _cbr(cin, cout, k=3, s=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class VGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, CLASSES))

    def forward(self, x):
        return self.classifier(self.features(x).view(x.size(0), -1))  # Shape/Gather/Concat/Reshape in ONNX


class AlexNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, 2, 2), nn.ReLU(), nn.LocalResponseNorm(5),
                                      nn.MaxPool2d(3, 2), nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(),
                                      nn.LocalResponseNorm(3), nn.MaxPool2d(3, 2))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(16 * 3 * 3, 32), nn.ReLU(), nn.Linear(32, CLASSES))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class InceptionBlock(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, pool):
        super().__init__()
        self.b1 = _cbr(cin, c1, 1)
        self.b2 = nn.Sequential(_cbr(cin, c3r, 1), _cbr(c3r, c3, 3))
        self.b3 = nn.Sequential(_cbr(cin, c5r, 1), _cbr(c5r, c5, 3), _cbr(c5, c5, 3))  # v2: two 3x3 for a 5x5
        self.b4 = nn.Sequential(nn.AvgPool2d(3, 1, 1), _cbr(cin, pool, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class InceptionV2ish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_cbr(3, 8, 3, 2), nn.MaxPool2d(3, 2, ceil_mode=True))
        self.mixed = InceptionBlock(8, 4, 4, 8, 2, 4, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(20, CLASSES)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.mixed(self.stem(x))), 1))


class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(s)), torch.relu(self.expand3x3(s))], 1)


class SqueezeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
                                      Fire(8, 4, 8), Fire(16, 4, 8))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Conv2d(16, CLASSES, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class Caffe2ResNet(nn.Module):
    """A ResNet as Caffe2 model files have it: conv, 5-input BatchNorm, residual sums, a ceil-mode
    max pool and a softmax head (the file gives probabilities). Exported, :func:`caffe2_style`
    turns its ``Add`` into ``Sum`` and its names into Caffe2's."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.branch2a = _cbr(8, 8, 1)
        self.branch2b = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=2, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(x + self.branch2b(self.branch2a(x)))
        return torch.softmax(self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)), 1)


def caffe2_style(model) -> dict[str, str]:
    """An exported ONNX ``model`` (changed in place) as Caffe2's converter wrote model-zoo files:
    two-input ``Add`` as ``Sum``, and initializers named ``conv1_w_0`` / ``conv1_b_0`` (BatchNorm's
    ``bn1_s_0``, ``bn1_b_0``, ``bn1_rm_0``, ``bn1_riv_0``). Returns ``{new name: torch name}``."""
    leaves = {"weight": "w", "bias": "b", "running_mean": "rm", "running_var": "riv"}
    rename = {}
    for init in model.graph.initializer:
        layer, dot, leaf = init.name.rpartition(".")
        if dot and leaf in leaves:
            rename[init.name] = f"{layer.replace('.', '_')}_{leaves[leaf]}_0"
            init.name = rename[init.name]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        if node.op_type == "Add":
            node.op_type = "Sum"
    return {new: old for old, new in rename.items()}
