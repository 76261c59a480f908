"""SwitOKD's WRN-16-k (``docs/models.md#backbones-of-the-heterogeneous-tables``): ``wrn16_1_switokd``,
``wrn16_2_switokd``, ``wrn16_8_switokd``, ``wrn16_10_switokd``.

The architecture is FFSD's pre-activation Zagoruyko-Komodakis WRN (:class:`okd.models.wide_resnet.WideResNet`,
biased convs, stride on a block's second conv, final BN momentum 0.9) with any widen factor; SwitOKD's file
holds a dropout module that its forward never calls, so there is no dropout. Only the initialisation differs:
every conv weight is Xavier-uniform with gain sqrt(2) and every conv bias 0; BN 1/0; the Linear keeps
PyTorch's default. ``wrn16_2_switokd`` is therefore ``wrn16_2`` with SwitOKD's init (the CRD-layout
``wrn16_2_crd`` is a different network). Taps as ``wrn16_2``.
"""

from __future__ import annotations

import math

from torch import nn

from okd.models._init import bn_one_zero_
from okd.models.registry import register_model
from okd.models.wide_resnet import WideResNet

PAPER = "SwitOKD (ECCV 2022)"


def init_switokd_(model: nn.Module) -> None:
    """SwitOKD's WRN init: conv weights Xavier-uniform (gain sqrt 2), conv biases 0, BN 1/0, Linear untouched."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight, gain=math.sqrt(2.0))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            bn_one_zero_(m)


class SwitOKDWideResNet(WideResNet):
    """WRN-depth-k of :class:`WideResNet` (no dropout), re-initialised by :func:`init_switokd_`."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100) -> None:
        super().__init__(depth, widen, num_classes, dropout=0.0)
        init_switokd_(self)


def _switokd(widen: int):
    def factory(num_classes: int = 100) -> SwitOKDWideResNet:
        return SwitOKDWideResNet(16, widen, num_classes)

    factory.__name__ = factory.__qualname__ = f"wrn16_{widen}_switokd"
    factory.__doc__ = f"WRN-16-{widen} as SwitOKD builds and initialises it."
    return factory


for _widen in (1, 2, 8, 10):
    register_model(
        f"wrn16_{_widen}_switokd", family="wide_resnet", depth=16, widen=_widen, init="switokd", paper=PAPER
    )(_switokd(_widen))
