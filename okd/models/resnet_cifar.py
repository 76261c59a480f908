"""CIFAR ResNets (``docs/models.md#cifar-resnets``).

- ``resnet20/32/56/110``: 6n+2 basic-block ResNets with the 1x1-conv+BN projection ("option B") in the
  first block of stages 2 and 3. Taps (FFSD): post-ReLU outputs of ``layer1``, ``layer2``, ``layer3``.
- ``resnet110_bottleneck`` (OKDDip/ONE/CL/PCL ResNet-110) and ``wrn20_8`` (their "WRN-20-8", a bottleneck
  [2,2,2] ResNet with ``width_per_group`` 512): projection in the first block of every stage. Taps: the
  three stage outputs (64x32x32, 128x16x16, 256x8x8); not used by FFSD, provided for uniformity.

Attribute names ``conv1, bn1, relu, layer1, layer2, layer3, avgpool, fc`` are part of the interface:
multi-branch networks take ``conv1..layer2`` of one instance as the trunk and ``layer3 + fc`` of other
instances as branches.
"""

from __future__ import annotations

from torch import Tensor, nn

from okd.models._init import init_he_fan_out
from okd.models.registry import register_model


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """conv3x3(s)-BN-ReLU-conv3x3-BN, + shortcut, ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_proj = stride != 1 or inplanes != planes
        self.downsample = _projection(inplanes, planes, stride) if needs_proj else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1-BN-ReLU-3x3(s)-BN-ReLU-1x1(x4)-BN, + shortcut, ReLU; inner width planes*width_per_group/64."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0))
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        needs_proj = stride != 1 or inplanes != out
        self.downsample = _projection(inplanes, out, stride) if needs_proj else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """Stem conv3x3(3->16)-BN-ReLU, three stages (16/32/64 planes, strides 1/2/2), GAP, Linear.

    Init: convs He-normal fan_out, BN 1/0, Linear PyTorch default (no zero-init of residual BNs).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int],
        num_classes: int = 100,
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self._inplanes = 16
        self.layer1 = self._make_layer(block, 16, layers[0], 1, width_per_group)
        self.layer2 = self._make_layer(block, 32, layers[1], 2, width_per_group)
        self.layer3 = self._make_layer(block, 64, layers[2], 2, width_per_group)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 64 * block.expansion
        self.tap_channels = tuple(c * block.expansion for c in (16, 32, 64))
        self.fc = nn.Linear(self.feature_dim, num_classes)
        init_he_fan_out(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, width_per_group: int) -> nn.Module:
        mods = [block(self._inplanes, planes, stride, width_per_group)]
        self._inplanes = planes * block.expansion
        mods += [block(self._inplanes, planes, 1, width_per_group) for _ in range(blocks - 1)]
        return nn.Sequential(*mods)

    def head(self, feat: Tensor) -> Tensor:
        """Global average pool + fc of the deepest feature map."""
        return self.fc(self.avgpool(feat).flatten(1))

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.relu(self.bn1(self.conv1(x)))
        t1 = self.layer1(x)
        t2 = self.layer2(t1)
        t3 = self.layer3(t2)
        return self.head(t3), [t1, t2, t3]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.head(self.layer3(self.layer2(self.layer1(x))))


def _basic(depth: int):
    n = (depth - 2) // 6

    def factory(num_classes: int = 100, **kwargs) -> CifarResNet:
        return CifarResNet(BasicBlock, (n, n, n), num_classes, **kwargs)

    factory.__name__ = factory.__qualname__ = f"resnet{depth}"
    factory.__doc__ = f"ResNet-{depth} for CIFAR (basic block, n={n}, option-B projection)."
    return factory


for _depth in (20, 32, 56, 110):
    register_model(f"resnet{_depth}", family="resnet_cifar", depth=_depth)(_basic(_depth))


@register_model("resnet110_bottleneck", family="resnet_cifar")
def resnet110_bottleneck(num_classes: int = 100, **kwargs) -> CifarResNet:
    """OKDDip/ONE/CL/PCL ResNet-110: Bottleneck x[12,12,12], outputs 64/128/256."""
    return CifarResNet(Bottleneck, (12, 12, 12), num_classes, **kwargs)


@register_model("wrn20_8", family="resnet_cifar")
def wrn20_8(num_classes: int = 100, **kwargs) -> CifarResNet:
    """OKDDip/ONE/PCL "WRN-20-8": Bottleneck x[2,2,2], width_per_group 512 (not a Zagoruyko WRN)."""
    kwargs.setdefault("width_per_group", 512)
    return CifarResNet(Bottleneck, (2, 2, 2), num_classes, **kwargs)
