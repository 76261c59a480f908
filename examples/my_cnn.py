"""A small CNN of one's own, trained by okd through `model.name: my_cnn:build` (see README, "Your own model
and data"). Any nn.Module works for DML/KD/KDCL/baseline; FFSD reads the outputs of layer1..layer3
(model.taps), which halve in size; branch methods (ONE, ...) cut it at a stage (model.branch_from)."""

from torch import nn


def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )  # fmt: skip


class MyCNN(nn.Module):
    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = stage(width, width, 1)  # H x W
        self.layer2 = stage(width, 2 * width, 2)  # H/2 x W/2
        self.layer3 = stage(2 * width, 4 * width, 2)  # H/4 x W/4
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


def build(num_classes: int, width: int = 32) -> nn.Module:
    return MyCNN(num_classes, width)
