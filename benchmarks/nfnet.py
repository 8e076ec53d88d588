"""An NFNet-F0 shaped like timm's `dm_nfnet_f0` (71.5 M parameters), built in-process (no downloads).

Convs are weight-standardized as in timm's ScaledStdConv2dSame: a learned per-filter gain, the fan-in scale
folded into F.batch_norm's weight, eps 1e-8, TF-"SAME" padding computed from the input's size. Activations are
scaled GELUs (gamma 1.7015), blocks are pre-activation with alpha/beta signal scaling, a squeeze-excite after the
last conv, and a skip-init gain.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vit_hybrid import pad_same

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))
from models import ScaledStdConv2d  # noqa: E402  (the fixtures' V7: timm's formula)

GELU_GAMMA = 1.7015043497085571


class ScaledStdConv2dSame(ScaledStdConv2d):
    def __init__(self, cin, cout, kernel, stride=1, groups=1, eps=1e-8):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=True, eps=eps)

    def forward(self, x):
        if self.kernel_size[0] > 1:
            x = pad_same(x, self.kernel_size[0], self.stride[0])
        return super().forward(x)


def act(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x) * GELU_GAMMA


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, ratio: float = 0.5):
        super().__init__()
        hidden = int(channels * ratio)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class NormFreeBlock(nn.Module):
    def __init__(self, cin, cout, stride, alpha, beta, group_size=128):
        super().__init__()
        mid = cout // 2
        self.alpha, self.beta = alpha, beta
        self.downsample = None
        if stride > 1 or cin != cout:
            self.pool = nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
            self.downsample = ScaledStdConv2dSame(cin, cout, 1)
        self.conv1 = ScaledStdConv2dSame(cin, mid, 1)
        self.conv2 = ScaledStdConv2dSame(mid, mid, 3, stride=stride, groups=mid // group_size)
        self.conv2b = ScaledStdConv2dSame(mid, mid, 3, groups=mid // group_size)
        self.conv3 = ScaledStdConv2dSame(mid, cout, 1)
        self.attn_last = SqueezeExcite(cout)
        self.attn_gain = 2.0
        self.skipinit_gain = nn.Parameter(torch.tensor(0.2))  # trained models' value is not 0: keep the branch live

    def forward(self, x):
        out = act(x) * self.beta
        shortcut = x if self.downsample is None else self.downsample(self.pool(out))
        out = self.conv1(out)
        out = self.conv2(act(out))
        out = self.conv2b(act(out))
        out = self.conv3(act(out))
        out = self.attn_gain * self.attn_last(out)
        return out * self.skipinit_gain * self.alpha + shortcut


class NFNetF0(nn.Module):
    def __init__(self, depths=(1, 2, 6, 3), channels=(256, 512, 1536, 1536), num_classes=1000, alpha=0.2):
        super().__init__()
        self.stem = nn.ModuleList(
            [
                ScaledStdConv2dSame(3, 16, 3, stride=2),
                ScaledStdConv2dSame(16, 32, 3),
                ScaledStdConv2dSame(32, 64, 3),
                ScaledStdConv2dSame(64, 128, 3, stride=2),
            ]
        )
        blocks, cin, expected = [], 128, 1.0
        for stage, (depth, cout) in enumerate(zip(depths, channels)):
            for i in range(depth):
                stride = 2 if i == 0 and stage > 0 else 1
                if i == 0:
                    expected = 1.0
                blocks.append(NormFreeBlock(cin, cout, stride, alpha, 1.0 / expected**0.5))
                expected += alpha**2
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.final_conv = ScaledStdConv2dSame(cin, 2 * cin, 1)
        self.head = nn.Linear(2 * cin, num_classes)

    def forward(self, x):
        for i, conv in enumerate(self.stem):
            x = conv(x) if i == 0 else conv(act(x))
        x = self.blocks(x)
        x = act(self.final_conv(x))
        return self.head(x.mean((2, 3)))


def nfnet_f0() -> NFNetF0:
    return NFNetF0()
