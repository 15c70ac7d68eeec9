"""ShuffleNetV2 (Ma et al. 2018): channel split, depthwise convs and channel shuffle."""

import torch
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _conv(cin, cout, kernel, stride=1, groups=1, act=True):
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
            *([nn.ReLU()] if act else [])]


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(*_conv(cin, cin, 3, stride, cin, act=False), *_conv(cin, half, 1))
        source = cin if stride > 1 else half
        self.branch2 = nn.Sequential(*_conv(source, half, 1), *_conv(half, half, 3, stride, half, act=False),
                                     *_conv(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """The 1.0x layout by default: stages of 116/232/464 channels, 4/8/4 units."""

    def __init__(self, num_classes: int = 1000, widths=(24, 116, 232, 464, 1024), repeats=(4, 8, 4)):
        super().__init__()
        self.conv1 = nn.Sequential(*_conv(3, widths[0], 3, 2))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, (width, n) in enumerate(zip(widths[1:4], repeats)):
            setattr(self, f"stage{i + 2}", nn.Sequential(*[ShuffleUnit(cin if j == 0 else width, width, 2 if j == 0 else 1)
                                                          for j in range(n)]))
            cin = width
        self.conv5 = nn.Sequential(*_conv(cin, widths[4], 1))
        self.fc = nn.Linear(widths[4], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.maxpool(self.conv1(x)))))
        return self.fc(self.conv5(x).mean([2, 3]))
