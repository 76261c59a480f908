"""HCGNet-A1 / A2 for CIFAR (Yang et al., "Gated Convolutional Networks with Hybrid Connectivity", AAAI 2020), as
MCL and L-MCL train them (``docs/models.md#backbones-of-the-heterogeneous-tables``): ``hcgnet_a1``, ``hcgnet_a2``.

A DenseNet-like network: a conv3x3 stem, three hybrid blocks of 8 gated (SMG) layers joined by two gated
transitions, BN-ReLU, global pooling, Linear. Every SMG layer adds g channels to its input by concatenation;
a transition compresses the channels by half and halves the resolution. Both kinds of unit compute a new map
x2 and combine it with two gates read from x2 itself:

- a *forget gate* (one value per channel in (0, 1)), from x2 pooled by a learnt softmax attention over its
  positions, squeezed to a narrower width, BN1d, tanh, expanded back, sigmoid;
- an *update* term: two depthwise 3x3 convs of x2 (dilation 1 and 2), each pooled by its own softmax
  attention to one vector per image; a squeeze over both vectors, BN1d and tanh feeds two channel-wise
  scores, softmax-normalised across the two paths, which mix the two vectors.

The unit's map is x2 x gate + mix, the mix broadcast over all positions. PyTorch's default init throughout.
Taps (as okd's DenseNets): the outputs of hybrid blocks 1 and 2 (before their transitions) and the final
BN-ReLU map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okd.models.registry import register_model

PAPERS = "MCL (AAAI 2022), L-MCL (TPAMI 2023); HCGNet (AAAI 2020)"
LAYERS_PER_BLOCK = 8
BN_SIZE = 4
SMG_GROUPS = 4


class PreActConv(nn.Module):
    """BN(cin) -> ReLU -> bias-free Conv2d(cin -> cout)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1, dilation: int = 1
    ) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.relu(self.bn(x), inplace=True))


class AttentionPool(nn.Module):
    """Softmax attention over the H x W positions (a biased conv1x1 c -> 1 gives the scores), then the
    attention-weighted sum of the map: B x C x H x W -> B x C x 1 x 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.score = nn.Conv2d(channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        weights = torch.softmax(self.score(x).flatten(1), dim=1)  # B x HW
        return torch.einsum("bcn,bn->bc", x.flatten(2), weights)[:, :, None, None]


class GatedUpdate(nn.Module):
    """The two gates of an SMG layer or transition on a map x2 of ``channels`` channels; returns x2 x forget
    gate + the attention-mixed depthwise paths.

    ``forget_width`` is the squeeze width of the forget gate, ``select_width`` that of the path selection.
    """

    def __init__(self, channels: int, forget_width: int, select_width: int) -> None:
        super().__init__()
        c = channels
        # forget gate
        self.forget_pool = AttentionPool(c)
        self.forget_squeeze = nn.Conv2d(c, forget_width, 1)
        self.forget_bn = nn.BatchNorm1d(forget_width)
        self.forget_expand = nn.Conv2d(forget_width, c, 1)
        # two depthwise paths, each with its own attention pooling
        self.path3 = PreActConv(c, c, 3, padding=1, groups=c)
        self.path5 = PreActConv(c, c, 3, padding=2, groups=c, dilation=2)
        self.pool3 = AttentionPool(c)
        self.pool5 = AttentionPool(c)
        # path selection
        self.select_squeeze = nn.Conv2d(2 * c, select_width, 1)
        self.select_bn = nn.BatchNorm1d(select_width)
        self.select3 = nn.Conv2d(select_width, c, 1)
        self.select5 = nn.Conv2d(select_width, c, 1)

    def forward(self, x2: Tensor) -> Tensor:
        s = self.forget_squeeze(self.forget_pool(x2))
        s = torch.tanh(self.forget_bn(s.flatten(1)))[:, :, None, None]
        gate = torch.sigmoid(self.forget_expand(s))

        z3 = self.pool3(self.path3(x2))
        z5 = self.pool5(self.path5(x2))
        t = self.select_squeeze(torch.cat([z3, z5], 1))
        t = torch.tanh(self.select_bn(t.flatten(1)))[:, :, None, None]
        w = torch.softmax(torch.stack([self.select3(t), self.select5(t)]), dim=0)  # 2 x B x C x 1 x 1
        return x2 * gate + w[0] * z3 + w[1] * z5


class SMGLayer(nn.Module):
    """One hybrid-block layer (cin -> cin + g): x2 = grouped 3x3 (4g -> g, 4 groups) of a 1x1 (cin -> 4g), both
    pre-activated; output concat[x, gated update of x2]."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.reduce = PreActConv(cin, BN_SIZE * growth, 1)
        self.conv = PreActConv(BN_SIZE * growth, growth, 3, padding=1, groups=SMG_GROUPS)
        self.update = GatedUpdate(growth, growth // 2, growth)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.update(self.conv(self.reduce(x)))], 1)


class GatedTransition(nn.Module):
    """cin -> cout = floor(cin / 2) at half resolution: x2 = 3x3/2 (cin - r -> cout) of a 1x1 (cin -> cin - r),
    r = (cin - cout) // 2, both pre-activated; output the gated update of x2 (no concatenation)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin - (cin - cout) // 2
        self.reduce = PreActConv(cin, mid, 1)
        self.conv = PreActConv(mid, cout, 3, stride=2, padding=1)
        self.update = GatedUpdate(cout, cout // 4, 2 * cout // 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.update(self.conv(self.reduce(x)))


class HCGNet(nn.Module):
    """conv3x3 (3 -> 2 g1, no bias), hybrid blocks of 8 SMG layers at growth g1, g2, g3 with two compressing
    transitions (theta 0.5), BN-ReLU, global pooling, Linear."""

    def __init__(self, growth: tuple[int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        c = 2 * growth[0]
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        blocks, transitions, taps = [], [], []
        for i, g in enumerate(growth):
            blocks.append(nn.Sequential(*(SMGLayer(c + j * g, g) for j in range(LAYERS_PER_BLOCK))))
            c += LAYERS_PER_BLOCK * g
            taps.append(c)
            if i < len(growth) - 1:
                transitions.append(GatedTransition(c, c // 2))
                c //= 2
        self.block1, self.block2, self.block3 = blocks
        self.trans1, self.trans2 = transitions
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        self.num_classes = num_classes
        self.feature_dim = c
        self.tap_channels = tuple(taps)

    def head(self, feat: Tensor) -> Tensor:
        """Global average pool + fc of the deepest tap (the final BN-ReLU map)."""
        return self.fc(self.avgpool(feat).flatten(1))

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        t1 = self.block1(self.conv1(x))
        t2 = self.block2(self.trans1(t1))
        t3 = self.relu(self.bn(self.block3(self.trans2(t2))))
        return self.head(t3), [t1, t2, t3]

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.trans2(self.block2(self.trans1(self.block1(self.conv1(x))))))
        return self.head(self.relu(self.bn(x)))


@register_model("hcgnet_a1", family="hcgnet", paper=PAPERS)
def hcgnet_a1(num_classes: int = 100) -> HCGNet:
    """HCGNet-A1 (growth 12, 24, 36)."""
    return HCGNet((12, 24, 36), num_classes)


@register_model("hcgnet_a2", family="hcgnet", paper=PAPERS)
def hcgnet_a2(num_classes: int = 100) -> HCGNet:
    """HCGNet-A2 (growth 24, 36, 64)."""
    return HCGNet((24, 36, 64), num_classes)
