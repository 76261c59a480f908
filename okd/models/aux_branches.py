"""A backbone with two auxiliary branches that repeat its later stages (L-MCL's networks, ``docs/methods.md#lmcl``).

A CIFAR backbone is read as four parts: the *front* (stem and stage 1), *stage 2*, the *back* (stage 3 and the
layers between it and global pooling: the final BN-ReLU of a WRN or HCGNet, the 1x1 conv to 1024 channels of a
ShuffleNetV2) and the classifier ``fc``. :class:`AuxBranchNet` runs the backbone and two branches of its own:

- head 1 (``aux1``) reads the stage-1 output and runs its own stage 2, back and classifier;
- head 2 (``aux2``) reads the stage-2 output and runs its own back and classifier;
- head 3 is the backbone's own head: the network that is deployed.

Every head pools its last map globally, so the three pooled features have the backbone's final width. The taps
are not detached: the branches train the backbone's front (and stage 2). The branches are taken from two more
instances of the backbone (the parts those instances hold besides are dropped), so they have the backbone's
block types, counts and strides; for the ResNet and CRD-WRN families the branches' classifier biases start at
zero (the reference wrappers' init; the convolutions and BNs already share the backbone's He fan-out and 1/0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from okd.errors import ConfigError
from okd.models.factory import create_model
from okd.models.hcgnet import HCGNet
from okd.models.resnet_cifar import CifarResNet
from okd.models.shufflenetv2 import ShuffleNetV2
from okd.models.wide_resnet_crd import CRDWideResNet

#: the heads of one network, shallow to deep (stage order of the reference code)
STAGES = ("aux1", "aux2", "backbone")


@dataclass(frozen=True)
class StageCut:
    """Module names of one backbone family: front (input -> stage-1 output), stage 2, back, classifier."""

    front: tuple[str, ...]
    stage2: tuple[str, ...]
    back: tuple[str, ...]
    fc: str = "fc"
    zero_branch_fc_bias: bool = False


CUTS: dict[type, StageCut] = {
    CifarResNet: StageCut(("conv1", "bn1", "relu", "layer1"), ("layer2",), ("layer3",), zero_branch_fc_bias=True),
    CRDWideResNet: StageCut(("conv1", "layer1"), ("layer2",), ("layer3", "bn1", "relu"), zero_branch_fc_bias=True),
    ShuffleNetV2: StageCut(("stem", "stage1"), ("stage2",), ("stage3", "head_conv")),
    HCGNet: StageCut(("conv1", "block1", "trans1"), ("block2", "trans2"), ("block3", "bn", "relu")),
}


def cut_for(net: nn.Module, name: str) -> StageCut:
    """The :class:`StageCut` of a backbone instance; ``ConfigError`` naming the supported families otherwise."""
    for cls, cut in CUTS.items():
        if type(net) is cls:
            return cut
    raise ConfigError(
        f"model {name!r} cannot carry L-MCL's auxiliary branches: they are defined for the CIFAR ResNets "
        "(resnet32, resnet56, resnet110_bottleneck, ...), the CRD WRNs (wrn16_2_crd, wrn40_2_crd, wrn28_4_crd), "
        "ShuffleNetV2 (shufflenetv2_x0_5, shufflenetv2_x1_0) and HCGNet (hcgnet_a1, hcgnet_a2)"
    )


def _run(parts: nn.Module, names: tuple[str, ...], x: Tensor) -> Tensor:
    for n in names:
        x = getattr(parts, n)(x)
    return x


def _pool(fmap: Tensor) -> Tensor:
    return F.adaptive_avg_pool2d(fmap, 1).flatten(1)


class AuxBranchNet(nn.Module):
    """``backbone`` (a plain instance of the registered network) plus ``aux1`` and ``aux2`` (module dicts).

    ``forward`` returns ``(features, logits)``: three pooled features (B x d each) and three logits, in the
    order of :data:`STAGES`.
    """

    def __init__(self, model: str, num_classes: int) -> None:
        super().__init__()
        self.model_name = str(model)
        self.backbone = create_model(model, num_classes)
        self.cut = cut_for(self.backbone, self.model_name)
        sources = [create_model(model, num_classes) for _ in range(2)]
        parts = (self.cut.stage2 + self.cut.back, self.cut.back)
        self.aux1, self.aux2 = (
            nn.ModuleDict({n: getattr(src, n) for n in (*names, self.cut.fc)})
            for src, names in zip(sources, parts, strict=True)
        )
        if self.cut.zero_branch_fc_bias:
            for branch in (self.aux1, self.aux2):
                nn.init.zeros_(branch[self.cut.fc].bias)
        self.feature_dim = int(self.backbone.feature_dim)

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        cut, net = self.cut, self.backbone
        t1 = _run(net, cut.front, x)
        t2 = _run(net, cut.stage2, t1)
        maps = [_run(self.aux1, cut.stage2 + cut.back, t1), _run(self.aux2, cut.back, t2), _run(net, cut.back, t2)]
        features = [_pool(m) for m in maps]
        heads = (self.aux1[cut.fc], self.aux2[cut.fc], getattr(net, cut.fc))
        return features, [fc(f) for fc, f in zip(heads, features, strict=True)]
