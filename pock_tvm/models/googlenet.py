"""GoogLeNet / Inception-v1 (Szegedy et al. 2015) without the auxiliary heads (eval mode): four
branches per block (1x1, 3x3, a second 3x3 as torchvision's, a pooling branch) concatenated,
ceil-mode max pooling."""

import torch
from torch import nn


def _conv(cin, cout, kernel, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout, eps=1e-3),
                         nn.ReLU())


class Inception(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, pool):
        super().__init__()
        self.branch1 = _conv(cin, c1, 1)
        self.branch2 = nn.Sequential(_conv(cin, c3r, 1), _conv(c3r, c3, 3))
        self.branch3 = nn.Sequential(_conv(cin, c5r, 1), _conv(c5r, c5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), _conv(cin, pool, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


# (c1, c3 reduce, c3, c5 reduce, c5, pool) of blocks 3a, 3b, 4a..4e, 5a, 5b
BLOCKS = [(64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), (192, 96, 208, 16, 48, 64),
          (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64), (112, 144, 288, 32, 64, 64),
          (256, 160, 320, 32, 128, 128), (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128)]


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 1000, scale: float = 1.0, blocks: int = len(BLOCKS)):
        super().__init__()
        s = lambda c: max(1, int(c * scale))  # noqa: E731
        self.conv1 = _conv(3, s(64), 7, 2)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = _conv(s(64), s(64), 1)
        self.conv3 = _conv(s(64), s(192), 3)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        layers, cin = [], s(192)
        for i, spec in enumerate(BLOCKS[:blocks]):
            block = Inception(cin, *[s(c) for c in spec])
            layers.append(block)
            cin = s(spec[0]) + s(spec[2]) + s(spec[4]) + s(spec[5])
            if i in (1, 6):
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
        self.inception = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool2(self.conv3(self.conv2(self.maxpool1(self.conv1(x)))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(self.inception(x)), 1)))
