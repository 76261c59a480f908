"""The layout both Wide ResNet families share (``docs/models.md#wide-resnets``): a 3x3 stem conv to 16
channels, three groups of (depth - 4)/6 blocks at 16k/32k/64k channels (first-block strides 1/2/2), a final
BN-ReLU, global average pooling and a Linear. Taps: the raw residual sums after groups 1 and 2 and the final
BN-ReLU map after group 3. The block, the conv bias and the final BN's momentum are the family's."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

#: ``block(cin, cout, stride)``: one residual block of a family
Block = Callable[[int, int, int], nn.Module]


class WideTrunk(nn.Module):
    """conv1, layer1..3 (``block(cin, width, stride)`` then ``block(width, width, 1)`` x (n - 1) per group), bn1,
    relu, avgpool, fc, built in that order; the family's subclass checks the depth and initialises."""

    def __init__(
        self, depth: int, widen: int, num_classes: int, block: Block, *, conv_bias: bool, final_bn_momentum: float
    ) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.num_classes = num_classes
        self.feature_dim = widths[2]
        self.tap_channels = widths
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=conv_bias)
        cin = 16
        groups = []
        for width, stride in zip(widths, (1, 2, 2), strict=True):
            groups.append(nn.Sequential(block(cin, width, stride), *(block(width, width, 1) for _ in range(n - 1))))
            cin = width
        self.layer1, self.layer2, self.layer3 = groups
        self.bn1 = nn.BatchNorm2d(widths[2], momentum=final_bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def head(self, feat: Tensor) -> Tensor:
        """Global average pool + fc of the deepest tap (the final BN-ReLU map)."""
        return self.fc(self.avgpool(feat).flatten(1))

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        t1 = self.layer1(self.conv1(x))
        t2 = self.layer2(t1)
        t3 = self.relu(self.bn1(self.layer3(t2)))
        return self.head(t3), [t1, t2, t3]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.relu(self.bn1(self.layer3(self.layer2(self.layer1(self.conv1(x)))))))
