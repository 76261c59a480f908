"""Multi-branch networks: a shared trunk and m branches, built from the registered backbones.

The split points are those of the ONE, CL-ILR, OKDDip and FFL code
(``docs/models.md#branch-methods-trunk-and-branches``); no model code is copied: the trunk is taken from
instance 0 of ``create_model(backbone)`` and branch i from instance i.

| family | trunk | each branch (own weights) |
|---|---|---|
| CIFAR ResNets (basic, ``resnet110_bottleneck``, ``wrn20_8``) | conv1, bn1, relu, layer1, layer2 | layer3, fc |
| DenseNet (``densenet40_12_bc``; also non-BC) | conv1, dense1, trans1, dense2, trans2 | dense3, final bn + ReLU, fc |
| VGG-16 | conv layers 1-10 (``trunk_features``, 512x2x2) | conv layers 11-13 + pool, 3-layer classifier |
| WRN-16-2 / WRN-40-2 (no reference split; by analogy) | conv1, layer1, layer2 | layer3, final bn + ReLU, fc |

Every branch ends with global average pooling of its final map and its classifier. ``share_branch_block``
reproduces the OKDDip repo's DenseNet bug (all branches hold the same dense-block object, only the final BN
and the FC are per branch); ``dropout`` sets the dropout of branch classifiers that have one (VGG: 0.5 in the
ONE/OKDDip files, 0 in the single model).

State-dict keys keep the backbone's module names (``shared.layer1...``, ``branches.0.layer3...``), and
:meth:`MultiBranchNet.single_branch` returns the trunk plus one branch as an instance of the backbone's own
class, so a ``deploy.pt`` of a branch method loads into ``create_model(backbone)`` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okd.errors import ConfigError
from okd.models.branch_split import BranchSplit
from okd.models.densenet import CifarDenseNet
from okd.models.factory import create_model
from okd.models.hcgnet import HCGNet
from okd.models.resnet_cifar import CifarResNet
from okd.models.shufflenetv2 import ShuffleNetV2
from okd.models.vgg import VGG16
from okd.models.wide_resnet import WideResNet
from okd.models.wide_resnet_crd import CRDWideResNet

Parts = nn.ModuleDict


def _run_in_order(parts: Parts, names: tuple[str, ...], x: Tensor) -> Tensor:
    for n in names:
        x = parts[n](x)
    return x


def _stage2_channels(net: nn.Module) -> int:
    return net.tap_channels[1]


def _densenet_trunk_channels(net: nn.Module) -> int:
    return net.trans2[2].out_channels


def _vgg_trunk_channels(net: nn.Module) -> int:
    return 512


SPLITS: dict[type, BranchSplit] = {
    CifarResNet: BranchSplit(
        trunk=("conv1", "bn1", "relu", "layer1", "layer2"),
        branch=("layer3", "fc"),
        head="fc",
        block="layer3",
        trunk_channels=_stage2_channels,
    ),
    CifarDenseNet: BranchSplit(
        trunk=("conv1", "dense1", "trans1", "dense2", "trans2"),
        branch=("dense3", "bn", "relu", "fc"),
        head="fc",
        block="dense3",
        trunk_channels=_densenet_trunk_channels,
    ),
    VGG16: BranchSplit(
        trunk=("trunk_features",),
        branch=("branch_features", "classifier"),
        head="classifier",
        block="branch_features",
        trunk_channels=_vgg_trunk_channels,
    ),
    WideResNet: BranchSplit(
        trunk=("conv1", "layer1", "layer2"),
        branch=("layer3", "bn1", "relu", "fc"),
        head="fc",
        block="layer3",
        trunk_channels=_stage2_channels,
    ),
}


def _stage1_channels(net: nn.Module) -> int:
    return net.tap_channels[0]


def _hcgnet_stage1_channels(net: nn.Module) -> int:
    return net.tap_channels[0] // 2  # HybridBlock1 then Transition1, which halves the channels


#: MCL(x4)'s split, one stage earlier than the branch methods': the trunk ends after stage 1
#: (docs/methods.md#mcl; methods-mcl.md 1.1). Every later stage, the final norm and the classifier are per branch.
STAGE1_SPLITS: dict[type, BranchSplit] = {
    CifarResNet: BranchSplit(
        trunk=("conv1", "bn1", "relu", "layer1"),
        branch=("layer2", "layer3", "fc"),
        head="fc",
        block="layer2",
        trunk_channels=_stage1_channels,
    ),
    CRDWideResNet: BranchSplit(
        trunk=("conv1", "layer1"),
        branch=("layer2", "layer3", "bn1", "relu", "fc"),
        head="fc",
        block="layer2",
        trunk_channels=_stage1_channels,
    ),
    ShuffleNetV2: BranchSplit(
        trunk=("stem", "stage1"),
        branch=("stage2", "stage3", "head_conv", "fc"),
        head="fc",
        block="stage2",
        trunk_channels=_stage1_channels,
    ),
    HCGNet: BranchSplit(
        trunk=("conv1", "block1", "trans1"),
        branch=("block2", "trans2", "block3", "bn", "relu", "fc"),
        head="fc",
        block="block2",
        trunk_channels=_hcgnet_stage1_channels,
    ),
}


def stage1_split_for(model: nn.Module, name: str = "") -> BranchSplit:
    """MCL(x4)'s split after stage 1 (``STAGE1_SPLITS``); ``ConfigError`` for other families."""
    for cls, split in STAGE1_SPLITS.items():
        if isinstance(model, cls):
            return split
    raise ConfigError(
        f"model {name or type(model).__name__!r} has no split after stage 1 (MCL's shared-trunk cohort); it is "
        "defined for the CIFAR ResNets (resnet32/56/110_bottleneck), the CRD WRNs (wrn16_2_crd, wrn40_2_crd, "
        "wrn28_4_crd), shufflenetv2_x0_5/x1_0 and hcgnet_a1/a2. Use independent networks instead "
        "(method.shared_trunk=false)"
    )


def split_for(model: nn.Module, name: str = "") -> BranchSplit:
    """The :class:`BranchSplit` of a backbone instance; ``ConfigError`` for families without one."""
    if getattr(model, "split", None) is not None and isinstance(model.split, BranchSplit):
        return model.split  # a user's network cut at model.branch_from (okd.models.staged.StagedNet)
    for cls, split in SPLITS.items():
        if isinstance(model, cls):
            return split
    families = ", ".join(c.__name__ for c in SPLITS)
    raise ConfigError(
        f"model {name or type(model).__name__!r} has no multi-branch split; branch methods support the "
        f"families {families} (e.g. resnet32, resnet110_bottleneck, wrn20_8, vgg16, densenet40_12_bc), and "
        "your own or timm networks made of stages called in order, with model.branch_from=<first branch stage>"
    )


def pool(fmap: Tensor) -> Tensor:
    """Global average pooling, flattened: B x C x H x W -> B x C."""
    return F.adaptive_avg_pool2d(fmap, 1).flatten(1)


@dataclass
class BranchOutputs:
    """One forward of a :class:`MultiBranchNet`: trunk output and, per branch, final map, feature, logits."""

    trunk: Tensor
    maps: list[Tensor]
    features: list[Tensor]
    logits: list[Tensor]


class MultiBranchNet(nn.Module):
    """A shared trunk and ``num_branches`` branches of ``backbone_name`` (the split table above)."""

    def __init__(
        self,
        backbone_name: str,
        num_classes: int,
        num_branches: int,
        *,
        dropout: float | None = None,
        share_branch_block: bool = False,
        split: Callable[[nn.Module, str], BranchSplit] = split_for,
    ) -> None:
        """``split`` picks the cut of a backbone instance: ``split_for`` (the branch methods'), or
        ``stage1_split_for`` (MCL's)."""
        super().__init__()
        if num_branches < 1:
            raise ConfigError(f"a multi-branch network needs at least 1 branch, got {num_branches}")
        self.backbone_name = backbone_name
        self.num_classes = num_classes
        self.num_branches = num_branches
        nets = [create_model(backbone_name, num_classes) for _ in range(num_branches)]
        self.split = split(nets[0], backbone_name)
        self.share_branch_block = share_branch_block
        self.shared = nn.ModuleDict({n: getattr(nets[0], n) for n in self.split.trunk})
        branches = []
        for net in nets:
            parts = {n: getattr(net, n) for n in self.split.branch}
            if share_branch_block:
                parts[self.split.block] = getattr(nets[0], self.split.block)
            branches.append(nn.ModuleDict(parts))
        self.branches = nn.ModuleList(branches)
        if dropout is not None:
            for branch in self.branches:
                for m in branch[self.split.head].modules():
                    if isinstance(m, nn.Dropout):
                        m.p = float(dropout)
        self.trunk_channels = int(self.split.trunk_channels(nets[0]))
        self.feature_dim = int(nets[0].feature_dim)  # = channels of each branch's final map
        self._singles: dict[int, nn.Module] = {}  # plain dict: not registered, no duplicate state

    def trunk(self, x: Tensor) -> Tensor:
        """The shared trunk's output (e.g. B x 32 x 16 x 16 for ResNet-32)."""
        return _run_in_order(self.shared, self.split.trunk, x)

    def branch_map(self, h: Tensor, i: int) -> Tensor:
        """Branch ``i``'s final feature map (the map that feeds global pooling)."""
        return _run_in_order(self.branches[i], self.split.branch_body, h)

    def branch_features(self, h: Tensor, i: int) -> Tensor:
        """Branch ``i``'s pooled penultimate feature, B x d."""
        return pool(self.branch_map(h, i))

    def branch_logits(self, feat: Tensor, i: int) -> Tensor:
        """Branch ``i``'s classifier on its pooled feature."""
        return self.branches[i][self.split.head](feat)

    def forward_branches(self, x: Tensor, trunk_hook: Callable[[Tensor], Tensor] | None = None) -> BranchOutputs:
        """Trunk once, then every branch. ``trunk_hook`` (e.g. CL-ILR's gradient rescaling) wraps the trunk output."""
        h = self.trunk(x)
        hb = trunk_hook(h) if trunk_hook is not None else h
        maps = [self.branch_map(hb, i) for i in range(self.num_branches)]
        feats = [pool(m) for m in maps]
        logits = [self.branch_logits(f, i) for i, f in enumerate(feats)]
        return BranchOutputs(trunk=h, maps=maps, features=feats, logits=logits)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of every branch."""
        return self.forward_branches(x).logits

    def single_branch(self, i: int) -> nn.Module:
        """The trunk plus branch ``i`` as one network of the backbone's own class (shares these weights).

        Built once per branch without consuming the global RNG; its ``state_dict`` has the backbone's keys.
        """
        if not 0 <= i < self.num_branches:
            raise ConfigError(f"branch {i} does not exist; this network has {self.num_branches} branches")
        if i not in self._singles:
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                net = create_model(self.backbone_name, self.num_classes)
            for n in self.split.trunk:
                setattr(net, n, self.shared[n])
            for n in self.split.branch:
                setattr(net, n, self.branches[i][n])
            own = {id(t) for t in (*self.parameters(), *self.buffers())}
            stray = [n for n, t in (*net.named_parameters(), *net.named_buffers()) if id(t) not in own]
            if stray:  # a backbone module outside the split: the split table is out of date
                raise RuntimeError(f"{self.backbone_name}: modules outside the branch split: {stray[:3]}")
            self._singles[i] = net
        return self._singles[i]
