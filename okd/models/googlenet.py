"""CIFAR GoogLeNet (kuangliu-style Inception-v1 for 32x32) as in FFSD (``docs/models.md#googlenet``): ``googlenet``.

The "5x5" path is 1x1 -> 3x3 -> 3x3. All convs have bias. Taps (FFSD): outputs of inception b3
(480x32x32), e4 (832x16x16) and b5 (1024x8x8).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from okd.models._init import init_he_fan_out
from okd.models.registry import register_model


def _cbr(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Inception(nn.Module):
    """Four parallel paths (1x1 | 1x1-3x3 | 1x1-3x3-3x3 | maxpool-1x1), concatenated."""

    def __init__(self, cin: int, n1: int, n3red: int, n3: int, n5red: int, n5: int, pool_proj: int) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*_cbr(cin, n1, 1))
        self.b2 = nn.Sequential(*_cbr(cin, n3red, 1), *_cbr(n3red, n3, 3))
        self.b3 = nn.Sequential(*_cbr(cin, n5red, 1), *_cbr(n5red, n5, 3), *_cbr(n5, n5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *_cbr(cin, pool_proj, 1))
        self.out_channels = n1 + n3 + n5 + pool_proj

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(nn.Module):
    """Stem conv3x3(3->192)-BN-ReLU, inception a3..b5 with two stride-2 max-pools, GAP, Linear(1024->K).

    Init: conv weights N(0, sqrt(2/(k^2 C_out))), conv biases and Linear PyTorch default, BN 1/0.
    """

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.pre_layers = nn.Sequential(*_cbr(3, 192, 3))
        self.a3 = Inception(192, 64, 96, 128, 16, 32, 32)
        self.b3 = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.a4 = Inception(480, 192, 96, 208, 16, 48, 64)
        self.b4 = Inception(512, 160, 112, 224, 24, 64, 64)
        self.c4 = Inception(512, 128, 128, 256, 24, 64, 64)
        self.d4 = Inception(512, 112, 144, 288, 32, 64, 64)
        self.e4 = Inception(528, 256, 160, 320, 32, 128, 128)
        self.a5 = Inception(832, 256, 160, 320, 32, 128, 128)
        self.b5 = Inception(832, 384, 192, 384, 48, 128, 128)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 1024
        self.tap_channels = (480, 832, 1024)
        self.fc = nn.Linear(1024, num_classes)
        init_he_fan_out(self, bn_types=(nn.BatchNorm2d,))

    def head(self, feat: Tensor) -> Tensor:
        """Global average pool + fc of the deepest tap (inception b5's output)."""
        return self.fc(self.avgpool(feat).flatten(1))

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        t1 = self.b3(self.a3(self.pre_layers(x)))
        t2 = self.e4(self.d4(self.c4(self.b4(self.a4(self.maxpool(t1))))))
        t3 = self.b5(self.a5(self.maxpool(t2)))
        return self.head(t3), [t1, t2, t3]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_taps(x)[0]


@register_model("googlenet", family="googlenet")
def googlenet(num_classes: int = 100) -> GoogLeNet:
    """FFSD's CIFAR GoogLeNet."""
    return GoogLeNet(num_classes)
