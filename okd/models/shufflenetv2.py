"""ShuffleNetV2 for 32x32 inputs, as MCL and L-MCL train it (``docs/models.md#backbones-of-the-heterogeneous-tables``):
``shufflenetv2_x0_5`` (stage widths 48/96/192) and ``shufflenetv2_x1_0`` (116/232/464).

A conv3x3 stem at full resolution (no max-pool), three stages (one down-sampling unit, then 3/7/3 basic units),
a 1x1 conv to 1024 channels, global pooling, Linear. Every conv is bias-free; PyTorch's default init throughout.
Taps: the outputs of stages 1 and 2 (16x16, 8x8) and the 1024-channel head map (4x4) that feeds pooling.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from okd.models.registry import register_model

PAPERS = "MCL (AAAI 2022), L-MCL (TPAMI 2023)"
HEAD_WIDTH = 1024
UNITS = (3, 7, 3)  # basic units per stage, after its down-sampling unit


def channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    """Interleave the channels of ``groups`` equal groups: (B, g, C/g, H, W) -> swap g and C/g -> (B, C, H, W)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, relu: bool = True) -> list:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class ShuffleUnit(nn.Module):
    """Stride-1 unit: keep the first half of the channels, run the second through 1x1-BN-ReLU, depthwise
    3x3-BN, 1x1-BN-ReLU, concatenate and shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.half = half
        self.branch = nn.Sequential(
            *_conv_bn(channels - half, half),
            *_conv_bn(half, half, 3, groups=half, relu=False),
            *_conv_bn(half, half),
        )

    def forward(self, x: Tensor) -> Tensor:
        kept, rest = x[:, : self.half], x[:, self.half :]
        return channel_shuffle(torch.cat([kept, self.branch(rest)], 1))


class ShuffleDownUnit(nn.Module):
    """Stride-2 unit (cin -> cout): two branches of cout/2 channels each, concatenated and shuffled.

    Left: depthwise 3x3/2-BN, 1x1-BN-ReLU. Right: 1x1-BN-ReLU, depthwise 3x3/2-BN, 1x1-BN-ReLU.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(*_conv_bn(cin, cin, 3, 2, groups=cin, relu=False), *_conv_bn(cin, mid))
        self.right = nn.Sequential(
            *_conv_bn(cin, mid),
            *_conv_bn(mid, mid, 3, 2, groups=mid, relu=False),
            *_conv_bn(mid, mid),
        )

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNetV2(nn.Module):
    """Stem conv3x3 (3 -> 24) + BN + ReLU; three stages at ``widths``; conv1x1 -> 1024 + BN + ReLU; pool; Linear."""

    def __init__(self, widths: tuple[int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = HEAD_WIDTH
        self.tap_channels = (widths[0], widths[1], HEAD_WIDTH)
        self.stem = nn.Sequential(*_conv_bn(3, 24, 3))
        stages = []
        cin = 24
        for width, units in zip(widths, UNITS, strict=True):
            stages.append(nn.Sequential(ShuffleDownUnit(cin, width), *(ShuffleUnit(width) for _ in range(units))))
            cin = width
        self.stage1, self.stage2, self.stage3 = stages
        self.head_conv = nn.Sequential(*_conv_bn(cin, HEAD_WIDTH))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(HEAD_WIDTH, num_classes)

    def head(self, feat: Tensor) -> Tensor:
        """Global average pool + fc of the deepest tap (the 1024-channel head map)."""
        return self.fc(self.avgpool(feat).flatten(1))

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        t1 = self.stage1(self.stem(x))
        t2 = self.stage2(t1)
        t3 = self.head_conv(self.stage3(t2))
        return self.head(t3), [t1, t2, t3]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.head_conv(self.stage3(self.stage2(self.stage1(self.stem(x))))))


@register_model("shufflenetv2_x0_5", family="shufflenetv2", width=0.5, paper=PAPERS)
def shufflenetv2_x0_5(num_classes: int = 100) -> ShuffleNetV2:
    """ShuffleNetV2 0.5x for CIFAR (stage widths 48, 96, 192)."""
    return ShuffleNetV2((48, 96, 192), num_classes)


@register_model("shufflenetv2_x1_0", family="shufflenetv2", width=1.0, paper=PAPERS)
def shufflenetv2_x1_0(num_classes: int = 100) -> ShuffleNetV2:
    """ShuffleNetV2 1x for CIFAR (stage widths 116, 232, 464)."""
    return ShuffleNetV2((116, 232, 464), num_classes)
