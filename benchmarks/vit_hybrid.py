"""A ViT-B/16 hybrid with a GN+WS ResNetV2-50 stem-and-three-stages backbone, shaped like timm's
`vit_base_r50_s16_224` (98.6 M parameters, a 0.39 GB float32 checkpoint), built in-process (no downloads).

The backbone's convs are TF-"SAME" weight-standardized convs as in timm's StdConv2dSame (V1 through
F.batch_norm, eps 1e-8); the transformer is 12 pre-norm blocks of width 768 with 12 heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / stride) - 1) * stride + kernel - ih, 0)
    pw = max((math.ceil(iw / stride) - 1) * stride + kernel - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=value)


class StdConv2dSame(nn.Conv2d):
    def __init__(self, cin, cout, kernel, stride=1, bias=False, eps=1e-8):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, bias=bias)
        self.eps = eps

    def forward(self, x):
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)


class Bottleneck(nn.Module):
    """timm's non-pre-activation ResNetV2 bottleneck (conv -> GN -> act)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        mid = cout // 4
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(StdConv2dSame(cin, cout, 1, stride), nn.GroupNorm(32, cout))
        self.conv1, self.norm1 = StdConv2dSame(cin, mid, 1), nn.GroupNorm(32, mid)
        self.conv2, self.norm2 = StdConv2dSame(mid, mid, 3, stride), nn.GroupNorm(32, mid)
        self.conv3, self.norm3 = StdConv2dSame(mid, cout, 1), nn.GroupNorm(32, cout)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTHybrid(nn.Module):
    def __init__(self, layers=(3, 4, 9), dim=768, depth=12, heads=12, num_classes=1000, img_size=224):
        super().__init__()
        self.stem_conv, self.stem_norm = StdConv2dSame(3, 64, 7, 2), nn.GroupNorm(32, 64)
        blocks, cin = [], 64
        for i, n in enumerate(layers):
            cout = 256 * 2**i
            for j in range(n):
                blocks.append(Bottleneck(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*blocks)
        self.proj = nn.Conv2d(cin, dim, 1)
        tokens = (img_size // 16) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.pretrained_cfg = {"input_size": (3, img_size, img_size)}

    def forward(self, x):
        x = F.relu(self.stem_norm(self.stem_conv(x)))
        x = F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, 2)
        x = self.proj(self.stages(x)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_base_r50_s16_224() -> ViTHybrid:
    return ViTHybrid()
