"""Weight initialisers shared by the backbone families (``docs/models.md``)."""

from __future__ import annotations

import math

from torch import nn


def conv_he_fan_out_(conv: nn.Conv2d, zero_bias: bool = False) -> None:
    """N(0, sqrt(2 / (kh * kw * C_out))): He-normal with fan_out (FFSD's and OKDDip's conv init)."""
    n = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / n))
    if zero_bias and conv.bias is not None:
        nn.init.zeros_(conv.bias)


def bn_one_zero_(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """BN gamma = 1, beta = 0."""
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)


def init_he_fan_out(
    model: nn.Module,
    zero_conv_bias: bool = False,
    bn_types: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.BatchNorm1d),
) -> None:
    """He fan_out on every Conv2d, BN 1/0 on every module of ``bn_types``; Linear layers keep PyTorch's default.

    The CIFAR GoogLeNet, WRN and DenseNet-40 pass ``bn_types=(nn.BatchNorm2d,)``: their reference
    code touches 2-d BN only.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            conv_he_fan_out_(m, zero_bias=zero_conv_bias)
        elif isinstance(m, bn_types):
            bn_one_zero_(m)
