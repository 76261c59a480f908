"""Feature-fusion blocks (``methods.md`` §1.2, reused by FFL §9).

- :class:`FusionModule` F: depthwise 3x3 + BN + ReLU over the M·C concatenated maps, 1x1 M·C -> C + BN + ReLU
  (the fused map Φ), global average pool, Linear(C -> K). Returns ``(logits, Φ)``.
- :class:`TransFusionDecoder`: FFSD's leader head, depthwise 3x3 C -> C + BN + ReLU, 1x1 C -> M·C + BN + ReLU.

Nothing here detaches its input: FFSD feeds F detached student maps, FFL does not.
"""

from __future__ import annotations

from torch import Tensor, nn

from okd.models._init import init_he_fan_out


class FusionModule(nn.Module):
    """Fusion module F over ``num_inputs`` maps of ``channels`` channels each (concatenated along C).

    Init: convs N(0, sqrt(2 / (k·k·C_out))), BN 1/0, Linear at the PyTorch default.
    """

    def __init__(self, channels: int, num_classes: int, num_inputs: int = 2) -> None:
        super().__init__()
        width = channels * num_inputs
        self.channels = channels
        self.num_inputs = num_inputs
        self.conv1 = nn.Conv2d(width, width, 3, stride=1, padding=1, groups=width, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels, num_classes)
        init_he_fan_out(self)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``u``: B x (M·C) x H x W. Returns ``(logits B x K, fused map Φ B x C x H x W)``."""
        x = self.relu1(self.bn1(self.conv1(u)))
        phi = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(phi.mean(dim=(2, 3))), phi


class TransFusionDecoder(nn.Module):
    """FFSD's leader decoder: C -> C depthwise 3x3 + BN + ReLU, 1x1 C -> M·C + BN + ReLU.

    Init as the CIFAR backbones' loop that creates it in the official code: convs N(0, sqrt(2/(k²·C_out))),
    BN 1/0.
    """

    def __init__(self, channels: int, num_outputs: int = 2) -> None:
        super().__init__()
        width = channels * num_outputs
        self.conv1 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        init_he_fan_out(self)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: B x C x H x W (the leader's deepest tap). Returns d_L: B x (M·C) x H x W."""
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(x)))
