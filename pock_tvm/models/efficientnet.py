"""EfficientNet-B0 (Tan & Le 2019): MBConv blocks with SiLU and squeeze-and-excitation."""

import torch
from torch import nn

from .mobilenet_v2 import make_divisible
from .mobilenet_v3 import SqueezeExcitation


def _conv(cin, cout, kernel, stride=1, groups=1, act=True):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), *([nn.SiLU()] if act else []))


class MBConv(nn.Module):
    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers = [] if expand == 1 else [_conv(cin, hidden, 1)]
        layers += [_conv(hidden, hidden, kernel, stride, hidden),
                   SqueezeExcitation(hidden, max(1, cin // 4), gate=nn.Sigmoid), _conv(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res_connect else y  # stochastic depth is the identity in eval mode


# EfficientNet-B0 stages: expand, kernel, stride, out channels, repeats
B0 = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
      (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


class EfficientNetB0(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, depth: int | None = None):
        super().__init__()
        stem = make_divisible(32 * width_mult)
        layers = [_conv(3, stem, 3, 2)]
        cin = stem
        for expand, k, stride, out, repeats in B0:
            cout = make_divisible(out * width_mult)
            for i in range(repeats if depth is None else min(repeats, depth)):
                layers.append(MBConv(cin, cout, k, stride if i == 0 else 1, expand))
                cin = cout
        head = make_divisible(1280 * width_mult)
        layers.append(_conv(cin, head, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(head, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
