"""ImageNet ResNet-18/34 and their TinyImageNet variants (``docs/models.md#imagenet-and-tinyimagenet-resnets``).

- ``resnet18`` / ``resnet34``: the torchvision layout (stem conv7x7/2 + BN + ReLU + max-pool 3/2, BasicBlock
  stages of 64/128/256/512 channels with [2,2,2,2] / [3,4,6,3] blocks, 1x1-conv+BN projections, global
  average pool, Linear 512 -> K). State-dict keys match torchvision's. At 64x64 (TinyImageNet) these are the
  "ImageNet stem" variants (last map 512x2x2).
- ``resnet18_cifar_stem`` / ``resnet34_cifar_stem``: the same stages behind a CIFAR stem (conv3x3/1 + BN +
  ReLU, no max-pool), the other TinyImageNet choice (last map 512x8x8 at 64x64). CMFF's released code
  does not define its TinyImageNet ResNets, so neither variant is "the" CMFF one.

Init (torchvision's): convs kaiming-normal (fan_out, relu), BN 1/0, Linear at the PyTorch default, no
zero-init of the residual BNs. Taps (FFSD): outputs of ``layer1`` .. ``layer4`` (64x56², 128x28², 256x14²,
512x7² at 224x224).
"""

from __future__ import annotations

from torch import Tensor, nn

from okd.models.registry import register_model
from okd.models.resnet_cifar import BasicBlock

STEMS = ("imagenet", "cifar")


class ImageNetResNet(nn.Module):
    """A BasicBlock ResNet with four stages; ``stem`` is ``'imagenet'`` (7x7/2 + max-pool) or ``'cifar'`` (3x3/1)."""

    def __init__(self, layers: tuple[int, int, int, int], num_classes: int = 1000, stem: str = "imagenet") -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        self.num_classes = num_classes
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self._inplanes = 64
        self.layer1 = self._make_layer(64, layers[0], 1)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 512
        self.tap_channels = (64, 128, 256, 512)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        mods = [BasicBlock(self._inplanes, planes, stride)]
        self._inplanes = planes
        mods += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*mods)

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def head(self, feat: Tensor) -> Tensor:
        """Global average pool + fc of the deepest feature map."""
        return self.fc(self.avgpool(feat).flatten(1))

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        t1 = self.layer1(self._stem(x))
        t2 = self.layer2(t1)
        t3 = self.layer3(t2)
        t4 = self.layer4(t3)
        return self.head(t4), [t1, t2, t3, t4]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer4(self.layer3(self.layer2(self.layer1(self._stem(x))))))


@register_model("resnet18", family="resnet_imagenet", stem="imagenet")
def resnet18(num_classes: int = 1000, **kwargs) -> ImageNetResNet:
    """ResNet-18, torchvision layout, ImageNet stem (also TinyImageNet's "ImageNet stem" variant at 64x64)."""
    return ImageNetResNet((2, 2, 2, 2), num_classes, stem="imagenet", **kwargs)


@register_model("resnet34", family="resnet_imagenet", stem="imagenet")
def resnet34(num_classes: int = 1000, **kwargs) -> ImageNetResNet:
    """ResNet-34, torchvision layout, ImageNet stem (also TinyImageNet's "ImageNet stem" variant at 64x64)."""
    return ImageNetResNet((3, 4, 6, 3), num_classes, stem="imagenet", **kwargs)


@register_model("resnet18_cifar_stem", family="resnet_imagenet", stem="cifar")
def resnet18_cifar_stem(num_classes: int = 200, **kwargs) -> ImageNetResNet:
    """ResNet-18 stages behind a CIFAR stem (conv3x3/1, no max-pool): the TinyImageNet variant with 8x8 last map."""
    return ImageNetResNet((2, 2, 2, 2), num_classes, stem="cifar", **kwargs)


@register_model("resnet34_cifar_stem", family="resnet_imagenet", stem="cifar")
def resnet34_cifar_stem(num_classes: int = 200, **kwargs) -> ImageNetResNet:
    """ResNet-34 stages behind a CIFAR stem (conv3x3/1, no max-pool): the TinyImageNet variant with 8x8 last map."""
    return ImageNetResNet((3, 4, 6, 3), num_classes, stem="cifar", **kwargs)
