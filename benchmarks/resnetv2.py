"""ResNetV2 (BiT) with GroupNorm + weight-standardized convs, built in-process (no downloads).

The WS conv computes V1 through F.batch_norm as timm's StdConv2d does (eps 1e-8 as in timm's BiT models);
`plain=True` builds the same architecture with nn.Conv2d, the reference for what a baked model should cost.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class StdConv2d(nn.Conv2d):
    def __init__(self, *args, eps=1e-8, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        )
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)


class PreActBottleneck(nn.Module):
    def __init__(self, conv, cin, cout, cmid, stride):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, cin)
        self.conv1 = conv(cin, cmid, 1, bias=False)
        self.norm2 = nn.GroupNorm(32, cmid)
        self.conv2 = conv(cmid, cmid, 3, stride=stride, padding=1, bias=False)
        self.norm3 = nn.GroupNorm(32, cmid)
        self.conv3 = conv(cmid, cout, 1, bias=False)
        self.downsample = conv(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        x = F.relu(self.norm1(x))
        shortcut = self.downsample(x) if self.downsample is not None else x
        x = self.conv1(x)
        x = self.conv2(F.relu(self.norm2(x)))
        x = self.conv3(F.relu(self.norm3(x)))
        return x + shortcut


class ResNetV2(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), width=1, num_classes=1000, plain=False):
        super().__init__()
        conv = nn.Conv2d if plain else StdConv2d
        wf = width
        self.stem = nn.Sequential(
            conv(3, 64 * wf, 7, stride=2, padding=3, bias=False), nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, stride=2)
        )
        blocks = []
        cin = 64 * wf
        for i, n in enumerate(layers):
            cmid = 64 * wf * 2**i
            cout = cmid * 4
            for j in range(n):
                blocks.append(PreActBottleneck(conv, cin, cout, cmid, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(32, cin)
        self.head = nn.Linear(cin, num_classes)
        self.pretrained_cfg = {"input_size": (3, 224, 224)}

    def forward(self, x):
        x = self.stages(self.stem(x))
        x = F.relu(self.norm(x))
        return self.head(x.mean((2, 3)))


def resnetv2_50(width: int = 1, plain: bool = False) -> ResNetV2:
    return ResNetV2((3, 4, 6, 3), width=width, plain=plain)


def resnetv2_101(width: int = 1, plain: bool = False) -> ResNetV2:
    return ResNetV2((3, 4, 23, 3), width=width, plain=plain)
