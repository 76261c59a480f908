"""MobileNets for 32x32 inputs, as SwitOKD trains them (``docs/models.md#backbones-of-the-heterogeneous-tables``).

- ``mobilenetv2_x0_5``: the RepDistiller/CRD "mobile_half" MobileNetV2 (stride-2 stem, width 0.5, ReLU, an
  expansion conv in every block, 1280-channel head). Taps: the last map at each resolution, 12x16x16, 16x8x8,
  48x4x4, and the 1280x2x2 head map. Init: conv N(0, sqrt(2 / (kh kw C_out))), BN 1/0, Linear N(0, 0.01)
  with bias 0.
- ``mobilenetv1``: MobileNet v1 with a stride-1 stem and 13 depthwise-separable blocks (SwitOKD's three-network
  scripts). Taps: the last map at each resolution, 64x32x32, 128x16x16, 256x8x8, 512x4x4, 1024x2x2. Init
  (``init="switokd"``, the default): every conv and Linear weight N(0, std 1 / fan_in), fan_in =
  C_in / groups x kh x kw (a Linear's in_features), BN weight 1, biases at PyTorch's default; ``init="torch"``
  keeps PyTorch's defaults.
"""

from __future__ import annotations

from torch import Tensor, nn

from okd.errors import ConfigError
from okd.models._init import bn_one_zero_, conv_he_fan_out_
from okd.models.registry import register_model

PAPER = "SwitOKD (ECCV 2022)"


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, relu: bool = True) -> list:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


# ----------------------------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """1x1 expand (x t, present even at t = 1)-BN-ReLU, depthwise 3x3 (stride)-BN-ReLU, 1x1 project-BN;
    + input when the stride is 1 and the width is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *_conv_bn(cin, hidden),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
            *_conv_bn(hidden, cout, relu=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


# (expansion, channels at width 1, blocks, first stride) of each stage, and the stages that end a resolution
V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
V2_TAP_AFTER = (1, 2, 4)  # stage indices whose output is a tap (16x16, 8x8, 4x4); the head map is the last tap
V2_HEAD = 1280


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 at width ``width`` (<= 1): stem conv3x3/2 (3 -> 32 w) + BN + ReLU, the 7 stages of
    :data:`V2_STAGES` at floor(c w) channels, conv1x1 -> 1280 + BN + ReLU, global pooling, Linear."""

    def __init__(self, width: float = 0.5, num_classes: int = 100) -> None:
        super().__init__()
        if not 0 < width <= 1:
            raise ValueError(f"this MobileNetV2 keeps its 1280-wide head only for width <= 1, got {width}")
        cin = int(32 * width)
        self.stem = nn.Sequential(*_conv_bn(3, cin, 3, 2))
        stages, taps = [], []
        for i, (t, c, n, s) in enumerate(V2_STAGES):
            cout = int(c * width)
            stages.append(
                nn.Sequential(
                    *(InvertedResidual(cin if j == 0 else cout, cout, s if j == 0 else 1, t) for j in range(n))
                )
            )
            cin = cout
            if i in V2_TAP_AFTER:
                taps.append(cout)
        self.stages = nn.ModuleList(stages)
        self.head_conv = nn.Sequential(*_conv_bn(cin, V2_HEAD))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(V2_HEAD, num_classes)
        self.num_classes = num_classes
        self.feature_dim = V2_HEAD
        self.tap_channels = (*taps, V2_HEAD)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                conv_he_fan_out_(m)
            elif isinstance(m, nn.BatchNorm2d):
                bn_one_zero_(m)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def head(self, feat: Tensor) -> Tensor:
        """Global average pool + fc of the deepest tap (the 1280-channel head map)."""
        return self.fc(self.avgpool(feat).flatten(1))

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.stem(x)
        taps = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in V2_TAP_AFTER:
                taps.append(x)
        taps.append(self.head_conv(x))
        return self.head(taps[-1]), taps

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(self.head_conv(x))


@register_model("mobilenetv2_x0_5", family="mobilenet", width=0.5, paper=PAPER)
def mobilenetv2_x0_5(num_classes: int = 100) -> MobileNetV2:
    """MobileNetV2 x0.5 for CIFAR (RepDistiller/CRD ``mobile_half``)."""
    return MobileNetV2(0.5, num_classes)


# ----------------------------------------------------------------------------------------------- MobileNet v1

# (output channels, stride) of the 13 depthwise-separable blocks, grouped by output resolution
V1_STAGES = (
    ((64, 1),),
    ((128, 2), (128, 1)),
    ((256, 2), (256, 1)),
    ((512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1)),
    ((1024, 2), (1024, 1)),
)


def init_normal_inverse_fan_in_(model: nn.Module) -> None:
    """SwitOKD's MobileNet re-initialisation: Conv2d and Linear weights N(0, std = 1 / fan_in), with fan_in =
    C_in / groups x kh x kw (in_features for a Linear); BN weights 1; biases keep their values."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 1.0 / m.weight[0].numel())
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)


class MobileNetV1(nn.Module):
    """Stem conv3x3 (3 -> 32) + BN + ReLU, 13 blocks of depthwise 3x3 (stride)-BN-ReLU then pointwise 1x1-BN-ReLU
    (:data:`V1_STAGES`), global pooling, Linear 1024 -> K."""

    def __init__(self, num_classes: int = 100, init: str = "switokd") -> None:
        super().__init__()
        if init not in ("switokd", "torch"):
            raise ConfigError(f"mobilenetv1 init must be 'switokd' or 'torch', got {init!r}")
        self.stem = nn.Sequential(*_conv_bn(3, 32, 3))
        cin, stages = 32, []
        for blocks in V1_STAGES:
            layers = []
            for cout, stride in blocks:
                layers += [*_conv_bn(cin, cin, 3, stride, groups=cin), *_conv_bn(cin, cout)]
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.num_classes = num_classes
        self.feature_dim = cin
        self.tap_channels = tuple(blocks[-1][0] for blocks in V1_STAGES)
        if init == "switokd":
            init_normal_inverse_fan_in_(self)

    def head(self, feat: Tensor) -> Tensor:
        """Global average pool + fc of the deepest tap (the last block's output)."""
        return self.fc(self.avgpool(feat).flatten(1))

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.stem(x)
        taps = []
        for stage in self.stages:
            x = stage(x)
            taps.append(x)
        return self.head(x), taps

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


@register_model("mobilenetv1", family="mobilenet", init="switokd", paper=PAPER)
def mobilenetv1(num_classes: int = 100, init: str = "switokd") -> MobileNetV1:
    """MobileNet v1 for CIFAR (SwitOKD's three-network scripts), SwitOKD's N(0, 1/fan_in) init by default."""
    return MobileNetV1(num_classes, init)
