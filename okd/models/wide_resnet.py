"""Zagoruyko-Komodakis pre-activation Wide ResNets as in FFSD (``docs/models.md#wide-resnets``): ``wrn16_2``,
``wrn40_2``.

Conv biases on; the stride sits on the *second* conv of a block; the final BN uses momentum 0.9 (a porting
quirk of the reference code, kept because the published numbers come from it). Taps (FFSD): the raw
residual sums after group 1 and group 2, and the final BN->ReLU output after group 3.
"""

from __future__ import annotations

from torch import Tensor, nn

from okd.models._init import init_he_fan_out
from okd.models._wide_trunk import WideTrunk
from okd.models.registry import register_model


class WideBasic(nn.Module):
    """BN-ReLU-conv3x3-Dropout-BN-ReLU-conv3x3(stride) + shortcut (identity or biased 1x1 conv)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, bias=True)
        needs_proj = stride != 1 or cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=True) if needs_proj else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.dropout(self.conv1(nn.functional.relu(self.bn1(x))))
        out = self.conv2(nn.functional.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(WideTrunk):
    """WRN-depth-k of :class:`WideBasic` blocks: biased convs, final BN momentum 0.9.

    Init: conv weights N(0, sqrt(2/(k^2 C_out))), conv biases and Linear PyTorch default, BN 1/0.
    """

    def __init__(self, depth: int, widen: int, num_classes: int = 100, dropout: float = 0.0) -> None:
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")

        def block(cin: int, cout: int, stride: int) -> WideBasic:
            return WideBasic(cin, cout, stride, dropout)

        super().__init__(depth, widen, num_classes, block, conv_bias=True, final_bn_momentum=0.9)
        init_he_fan_out(self, bn_types=(nn.BatchNorm2d,))


@register_model("wrn16_2", family="wide_resnet")
def wrn16_2(num_classes: int = 100, dropout: float = 0.0) -> WideResNet:
    """WRN-16-2 (FFSD ``wideresnet1602``)."""
    return WideResNet(16, 2, num_classes, dropout)


@register_model("wrn40_2", family="wide_resnet")
def wrn40_2(num_classes: int = 100, dropout: float = 0.0) -> WideResNet:
    """WRN-40-2 (FFSD ``wideresnet4002``)."""
    return WideResNet(40, 2, num_classes, dropout)
