"""CrossVGG16 for CMFF (``docs/methods.md#cmff``): one of CMFF's two VGG networks as a standalone backbone.

A shared-style stem of two conv3x3-BN-ReLU layers (64 channels) and a max-pool, then 4 stages of 3 conv3x3-BN-ReLU
layers + max-pool (128, 256, 512, 512; 14 convs in all, one more than VGG-16 in stage 1) and the 512-512-K
classifier. Registered so that a CMFF ``deploy.pt`` (net 1 alone) loads with ``create_model('cmff_vgg16', K)``.
"""

from __future__ import annotations

from torch import Tensor, nn

from okd.models.registry import register_model
from okd.models.vgg import init_vgg, make_vgg_classifier, make_vgg_stages

CMFF_VGG_STEM = ((64, 64),)
CMFF_VGG_PLAN = ((128, 128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class CMFFVGG16(nn.Module):
    """One network of CMFF's CrossVGG16 as a plain backbone (``docs/methods.md#cmff``).

    ``stem``: conv3x3(3->64, bias)-BN-ReLU-conv3x3(64->64)-BN-ReLU-maxpool (64x16x16); ``stages``: 4 x [3 x
    conv3x3(bias)-BN-ReLU, maxpool] with 128/256/512/512 channels (-> 512x1x1); ``classifier``: Linear 512-512-K
    (ReLU, Dropout(p) after the first two). Init as the release (= ``vgg16``'s): conv kaiming fan_out with
    bias 0, BN 1/0, Linear N(0, 0.01) with bias 0. Taps: outputs of stages 2, 3, 4 (256x4x4, 512x2x2, 512x1x1).
    """

    def __init__(self, num_classes: int = 100, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = 512
        self.tap_channels = (256, 512, 512)
        self.stem = make_vgg_stages(CMFF_VGG_STEM, 3)[0]
        self.stages = make_vgg_stages(CMFF_VGG_PLAN, 64)
        self.classifier = make_vgg_classifier(num_classes, dropout)
        init_vgg(self)

    def head(self, feat: Tensor) -> Tensor:
        return self.classifier(feat.flatten(1))

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        h = self.stages[0](self.stem(x))
        taps = []
        for stage in self.stages[1:]:
            h = stage(h)
            taps.append(h)
        return self.head(h), taps

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


@register_model("cmff_vgg16", family="cmff_vgg")
def cmff_vgg16(num_classes: int = 100, dropout: float = 0.0) -> CMFFVGG16:
    """One CMFF CrossVGG16 network (shared-stem layout, 14 convs): what ``cmff`` deploys for the VGG."""
    return CMFFVGG16(num_classes, dropout)
