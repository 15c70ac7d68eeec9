"""The demo's CNN: VGG-style conv-BN-ReLU stages over 24x24 grey digits, global pooling, linear.

Three stages: six 3x3 convs of 16 channels at 24x24, two of 32 at 12x12, two of 64 at 6x6 (the
first conv of a stage has stride 2). Most activation memory is in the first stage, most weights in
the last, which is what makes the choice of what to update matter (see ``pock_tvm.search``).
"""

import torch
from torch import nn

STAGES = ((16, 6), (32, 2), (64, 2))  # (channels, convs) per stage


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        layers, cin = [], in_channels
        for stage, (cout, count) in enumerate(STAGES):
            for i in range(count):
                layers.append(_conv_bn(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
