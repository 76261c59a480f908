"""Stage-by-stage access to the backbones CMFF runs (``cmff_vgg16``, the CIFAR and the ImageNet ResNets): their
stem, stages, classifier input and classifier, by backbone kind (:mod:`okd.methods.cmff`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from okd.errors import ConfigError
from okd.models.cmff_vgg import CMFFVGG16
from okd.models.resnet_cifar import CifarResNet
from okd.models.resnet_imagenet import ImageNetResNet

#: parameterised modules of the stem and of the classifier, per backbone kind (attribute names)
STEM_MODULES = {"vgg": ("stem",), "resnet_cifar": ("conv1", "bn1"), "resnet_imagenet": ("conv1", "bn1")}
HEAD_MODULES = {"vgg": ("classifier",), "resnet_cifar": ("fc",), "resnet_imagenet": ("fc",)}
SUPPORTED = "cmff_vgg16, the CIFAR ResNets (resnet20/32/56/110, ...) and the ImageNet ResNets (resnet18, ...)"


def backbone_kind(net: nn.Module) -> str:
    """``"vgg"``, ``"resnet_cifar"`` or ``"resnet_imagenet"``; any other network is refused."""
    if isinstance(net, CMFFVGG16):
        return "vgg"
    if isinstance(net, CifarResNet):
        return "resnet_cifar"
    if isinstance(net, ImageNetResNet):
        return "resnet_imagenet"
    raise ConfigError(f"cmff supports {SUPPORTED}; got a {type(net).__name__}")


def run_stem(net: nn.Module, kind: str, x: Tensor) -> Tensor:
    """The stem of ``net`` on ``x`` (the ImageNet ResNets include their max-pool)."""
    if kind == "vgg":
        return net.stem(x)
    x = net.relu(net.bn1(net.conv1(x)))
    return net.maxpool(x) if kind == "resnet_imagenet" else x


def stage_list(net: nn.Module, kind: str) -> list[nn.Module]:
    """The stages of ``net`` in order: the VGG's 4 ``stages``, a ResNet's ``layer1..3`` (``..4``: ImageNet)."""
    if kind == "vgg":
        return list(net.stages)
    names = ("layer1", "layer2", "layer3") + (("layer4",) if kind == "resnet_imagenet" else ())
    return [getattr(net, n) for n in names]


def final_feature(final: Tensor, kind: str) -> Tensor:
    """The classifier input: the flattened 512x1x1 map (VGG) or the globally pooled map (ResNets)."""
    return final.flatten(1) if kind == "vgg" else F.adaptive_avg_pool2d(final, 1).flatten(1)


def classify(net: nn.Module, kind: str, feat: Tensor) -> Tensor:
    """The classifier of ``net`` on the feature of :func:`final_feature`."""
    return net.classifier(feat) if kind == "vgg" else net.fc(feat)
