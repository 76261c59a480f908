"""CIFAR VGG-16-BN as in OKDDip/PCL (``docs/models.md#vgg-16``): ``vgg16``.

Layout for the multi-branch split (``docs/models.md#branch-methods-trunk-and-branches``):
- ``trunk_features``: conv layers 1-10 with 4 max-pools (64,64,M,128,128,M,256x3,M,512x3,M) -> 512x2x2;
- ``branch_features``: conv layers 11-13 + max-pool -> 512x1x1;
- ``classifier``: Linear 512-512-K with ReLU and Dropout(p) after the first two.

Taps (not used by FFSD; documented choice): the pooled outputs of the 256-block (256x4x4), of the first
512-block (the trunk output, 512x2x2) and of the second 512-block (512x1x1, the classifier input).
"""

from __future__ import annotations

from torch import Tensor, nn

from okd.models._init import bn_one_zero_
from okd.models.registry import register_model

TRUNK_PLAN = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512))
BRANCH_PLAN = ((512, 512, 512),)


def make_vgg_stages(plan: tuple[tuple[int, ...], ...], cin: int) -> nn.Sequential:
    """One nn.Sequential per channel group: [conv3x3(bias)-BN-ReLU]* then MaxPool 2."""
    stages = []
    for group in plan:
        layers: list[nn.Module] = []
        for cout in group:
            conv = nn.Conv2d(cin, cout, 3, padding=1, bias=True)
            layers += [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        layers.append(nn.MaxPool2d(2, 2))
        stages.append(nn.Sequential(*layers))
    return nn.Sequential(*stages)


def make_vgg_classifier(num_classes: int, dropout: float = 0.0, width: int = 512) -> nn.Sequential:
    """Linear(512->512)-ReLU-Dropout-Linear(512->512)-ReLU-Dropout-Linear(512->K)."""
    return nn.Sequential(
        nn.Linear(width, width), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(width, width), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(width, num_classes),
    )  # fmt: skip


def init_vgg(model: nn.Module) -> None:
    """Conv kaiming fan_out (relu) with bias 0, BN 1/0, Linear N(0, 0.01) with bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            bn_one_zero_(m)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class VGG16(nn.Module):
    """CIFAR VGG-16-BN: 13 conv (bias) + BN + ReLU, 5 max-pools, classifier 512-512-K (dropout p)."""

    def __init__(self, num_classes: int = 100, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = 512
        self.tap_channels = (256, 512, 512)
        self.trunk_features = make_vgg_stages(TRUNK_PLAN, 3)
        self.branch_features = make_vgg_stages(BRANCH_PLAN, 512)
        self.classifier = make_vgg_classifier(num_classes, dropout)
        init_vgg(self)

    def head(self, feat: Tensor) -> Tensor:
        """Flatten the 512x1x1 map and classify."""
        return self.classifier(feat.flatten(1))

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        t1 = self.trunk_features[:3](x)
        t2 = self.trunk_features[3](t1)
        t3 = self.branch_features(t2)
        return self.head(t3), [t1, t2, t3]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.branch_features(self.trunk_features(x)))


@register_model("vgg16", family="vgg")
def vgg16(num_classes: int = 100, dropout: float = 0.0) -> VGG16:
    """OKDDip/PCL CIFAR VGG-16-BN (dropout 0 as in the single model; the GL/ONE branches use 0.5)."""
    return VGG16(num_classes, dropout)
