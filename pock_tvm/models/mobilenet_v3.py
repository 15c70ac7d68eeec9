"""MobileNetV3-Small (Howard et al. 2019): hard-swish, squeeze-and-excitation with hard-sigmoid."""

import torch
from torch import nn

from .mobilenet_v2 import make_divisible


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int, gate=nn.Hardsigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


def _conv(cin, cout, kernel, stride, groups, act):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), *([act()] if act else []))


class InvertedResidualV3(nn.Module):
    def __init__(self, cin, kernel, expanded, cout, se: bool, act, stride):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers = [] if expanded == cin else [_conv(cin, expanded, 1, 1, 1, act)]
        layers.append(_conv(expanded, expanded, kernel, stride, expanded, act))
        if se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4)))
        layers.append(_conv(expanded, cout, 1, 1, 1, None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res_connect else y


# MobileNetV3-Small: kernel, expanded, out, SE, activation, stride
SMALL = [(3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
         (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
         (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
         (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1)]


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, blocks: int = len(SMALL)):
        super().__init__()
        acts = {"RE": nn.ReLU, "HS": nn.Hardswish}
        first = make_divisible(16 * width_mult)
        layers = [_conv(3, first, 3, 2, 1, nn.Hardswish)]
        cin = first
        for k, exp, out, se, act, stride in SMALL[:blocks]:
            cout = make_divisible(out * width_mult)
            layers.append(InvertedResidualV3(cin, k, make_divisible(exp * width_mult), cout, se, acts[act], stride))
            cin = cout
        last = 6 * cin
        layers.append(_conv(cin, last, 1, 1, 1, nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last, make_divisible(1024 * width_mult)), nn.Hardswish(),
                                        nn.Dropout(0.2), nn.Linear(make_divisible(1024 * width_mult), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
