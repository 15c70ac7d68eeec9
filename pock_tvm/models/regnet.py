"""RegNetY (Radosavovic et al. 2020): ResNet-style stages of grouped-conv bottlenecks with SE."""

import torch
from torch import nn

from .mobilenet_v3 import SqueezeExcitation


def _conv(cin, cout, kernel, stride=1, groups=1, act=True):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), *([nn.ReLU()] if act else []))


class YBlock(nn.Module):
    def __init__(self, cin, cout, stride, group_width):
        super().__init__()
        self.proj = None if stride == 1 and cin == cout else _conv(cin, cout, 1, stride, act=False)
        self.a = _conv(cin, cout, 1)
        self.b = _conv(cout, cout, 3, stride, cout // group_width)
        self.se = SqueezeExcitation(cout, max(1, cin // 4), gate=nn.Sigmoid)
        self.c = _conv(cout, cout, 1, act=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.relu(shortcut + self.c(self.se(self.b(self.a(x)))))


class RegNetY(nn.Module):
    """RegNetY-400MF's layout by default (widths 48/104/208/440, depths 1/3/6/6, groups of 8)."""

    def __init__(self, num_classes: int = 1000, widths=(48, 104, 208, 440), depths=(1, 3, 6, 6),
                 group_width: int = 8, stem: int = 32):
        super().__init__()
        self.stem = _conv(3, stem, 3, 2)
        stages, cin = [], stem
        for width, depth in zip(widths, depths):
            stages.append(nn.Sequential(*[YBlock(cin if i == 0 else width, width, 2 if i == 0 else 1, group_width)
                                          for i in range(depth)]))
            cin = width
        self.trunk_output = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.trunk_output(self.stem(x))), 1))
