"""CRD-layout Wide ResNets, the WRN-d-k of MCL, L-MCL and SwitOKD's heterogeneous pairs
(``docs/models.md#backbones-of-the-heterogeneous-tables``): ``wrn16_2_crd``, ``wrn40_2_crd``, ``wrn28_4_crd``.

Not the FFSD network registered as ``wrn16_2``/``wrn40_2`` (``wide_resnet.py``): here every conv is bias-free,
a block's stride sits on its *first* conv, a block that changes width pre-activates its input once and feeds
that activated map to both paths (the 1x1 projection included), and every BN keeps PyTorch's momentum.
Taps: the raw residual sums after groups 1 and 2 and the final BN-ReLU map after group 3.
"""

from __future__ import annotations

from torch import Tensor, nn

from okd.models._init import init_he_fan_out
from okd.models._wide_trunk import WideTrunk
from okd.models.registry import register_model

PAPERS = "MCL (AAAI 2022), L-MCL (TPAMI 2023); the RepDistiller/CRD wrn.py layout"


class CRDWideBlock(nn.Module):
    """Pre-activation basic block: [BN-ReLU] conv3x3(stride) - BN-ReLU - conv3x3, + shortcut, no final ReLU.

    When the width changes, the shortcut is a bias-free 1x1 conv (stride ``stride``) that reads the same
    BN-ReLU map as the main path; otherwise it is the raw input.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        if cin == cout and stride != 1:
            raise ValueError("a CRD WRN block changes resolution only together with its width")
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        act = nn.functional.relu(self.bn1(x), inplace=True)
        out = self.conv2(nn.functional.relu(self.bn2(self.conv1(act)), inplace=True))
        return out + (x if self.shortcut is None else self.shortcut(act))


class CRDWideResNet(WideTrunk):
    """WRN-depth-k of :class:`CRDWideBlock` blocks: bias-free convs, every BN at PyTorch's momentum.

    Init: conv weights N(0, sqrt(2 / (kh kw C_out))), BN 1/0, Linear bias 0 (weight at PyTorch's default).
    """

    def __init__(self, depth: int, widen: int, num_classes: int = 100) -> None:
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        super().__init__(depth, widen, num_classes, CRDWideBlock, conv_bias=False, final_bn_momentum=0.1)
        init_he_fan_out(self)
        nn.init.zeros_(self.fc.bias)


def _crd(depth: int, widen: int):
    def factory(num_classes: int = 100) -> CRDWideResNet:
        return CRDWideResNet(depth, widen, num_classes)

    factory.__name__ = factory.__qualname__ = f"wrn{depth}_{widen}_crd"
    factory.__doc__ = f"WRN-{depth}-{widen} in the CRD layout (MCL/L-MCL ``wrn_{depth}_{widen}``)."
    return factory


for _depth, _widen in ((16, 2), (40, 2), (28, 4)):
    register_model(f"wrn{_depth}_{_widen}_crd", family="wide_resnet_crd", depth=_depth, widen=_widen, paper=PAPERS)(
        _crd(_depth, _widen)
    )
