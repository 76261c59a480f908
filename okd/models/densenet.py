"""CIFAR DenseNets (``docs/models.md#densenets``).

- ``densenet40_12``: FFSD's non-BC DenseNet-40-12 (no bottleneck, no compression, 456 final channels).
  Taps (FFSD): output of dense block 1 (before transition 1), of dense block 2, and the final BN->ReLU.
- ``densenet40_12_bc``: OKDDip/ONE/PCL DenseNet-40-12-BC (bottleneck, compression 0.5, [6,6,6]).
  Taps (not used by FFSD, by analogy): outputs of dense blocks 1 and 2 (96x32x32, 120x16x16) and the
  final BN->ReLU (132x8x8). Attribute names ``conv1, dense1, trans1, dense2, trans2, dense3, bn, fc`` let
  multi-branch networks split after ``trans2``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from okd.models._init import bn_one_zero_, init_he_fan_out
from okd.models.registry import register_model


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3(->growth), or with ``bottleneck`` BN-ReLU-conv1x1(->4g)-BN-ReLU-conv3x3(->g);
    the output is concatenated to the input."""

    def __init__(self, cin: int, growth: int, bottleneck: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = cin
        if bottleneck:
            layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, 4 * growth, 1, bias=False)]
            c = 4 * growth
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, growth, 3, padding=1, bias=False)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.body(x)], 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1-AvgPool2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2)
        )


def _dense_block(cin: int, n: int, growth: int, bottleneck: bool) -> nn.Sequential:
    return nn.Sequential(*[DenseLayer(cin + i * growth, growth, bottleneck) for i in range(n)])


class CifarDenseNet(nn.Module):
    """Stem conv3x3(3->2g), three dense blocks with two transitions, BN-ReLU, GAP, Linear."""

    def __init__(
        self,
        depth: int = 40,
        growth: int = 12,
        num_classes: int = 100,
        bottleneck: bool = False,
        compression: float = 1.0,
    ) -> None:
        super().__init__()
        n = (depth - 4) // 3 // (2 if bottleneck else 1)
        self.num_classes = num_classes
        c = 2 * growth
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        taps = []
        self.dense1 = _dense_block(c, n, growth, bottleneck)
        c += n * growth
        taps.append(c)
        self.trans1 = Transition(c, int(c * compression))
        c = int(c * compression)
        self.dense2 = _dense_block(c, n, growth, bottleneck)
        c += n * growth
        taps.append(c)
        self.trans2 = Transition(c, int(c * compression))
        c = int(c * compression)
        self.dense3 = _dense_block(c, n, growth, bottleneck)
        c += n * growth
        taps.append(c)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        self.feature_dim = c
        self.tap_channels = tuple(taps)

    def head(self, feat: Tensor) -> Tensor:
        """Global average pool + fc of the deepest tap (the final BN->ReLU map)."""
        return self.fc(self.avgpool(feat).flatten(1))

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        t1 = self.dense1(self.conv1(x))
        t2 = self.dense2(self.trans1(t1))
        t3 = self.relu(self.bn(self.dense3(self.trans2(t2))))
        return self.head(t3), [t1, t2, t3]

    def forward(self, x: Tensor) -> Tensor:
        x = self.trans2(self.dense2(self.trans1(self.dense1(self.conv1(x)))))
        return self.head(self.relu(self.bn(self.dense3(x))))


@register_model("densenet40_12", family="densenet")
def densenet40_12(num_classes: int = 100) -> CifarDenseNet:
    """FFSD DenseNet-40-12 (non-BC). Init: conv N(0, sqrt(2/(k^2 C_out))), BN 1/0, Linear default."""
    model = CifarDenseNet(40, 12, num_classes, bottleneck=False, compression=1.0)
    init_he_fan_out(model, bn_types=(nn.BatchNorm2d,))
    return model


@register_model("densenet40_12_bc", family="densenet")
def densenet40_12_bc(num_classes: int = 100) -> CifarDenseNet:
    """OKDDip DenseNet-40-12-BC. Init: conv kaiming-normal fan_in, BN 1/0, Linear bias 0."""
    model = CifarDenseNet(40, 12, num_classes, bottleneck=True, compression=0.5)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            bn_one_zero_(m)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return model
