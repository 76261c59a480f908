"""Feature-fusion blocks (FFSD: ``docs/methods.md#ffsd``, FFSD.2; reused by FFL, ``docs/methods.md#ffl``).

- :class:`FusionModule` F: depthwise 3x3 + BN + ReLU over the M·C concatenated maps, 1x1 M·C -> C + BN + ReLU
  (the fused map Φ), global average pool, Linear(C -> K). Returns ``(logits, Φ)``.
- :class:`TransFusionDecoder`: FFSD's leader head, depthwise 3x3 C -> C + BN + ReLU, 1x1 C -> M·C + BN + ReLU.

Nothing here detaches its input: FFSD feeds F detached student maps, FFL does not.
"""

from __future__ import annotations

from torch import Tensor, nn

from okd.models._init import init_he_fan_out


class _DepthwisePointwise(nn.Module):
    """Depthwise 3x3 ``in_channels`` + BN + ReLU, then 1x1 ``in_channels`` -> ``out_channels`` + BN + ReLU.

    The two stages both blocks below share (module names ``conv1 bn1 relu1 conv2 bn2 relu2``).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=1, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)

    def _stages(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(x)))


class FusionModule(_DepthwisePointwise):
    """Fusion module F over ``num_inputs`` maps of ``channels`` channels each (concatenated along C).

    Init: convs N(0, sqrt(2 / (k·k·C_out))), BN 1/0, Linear at the PyTorch default.
    """

    def __init__(self, channels: int, num_classes: int, num_inputs: int = 2) -> None:
        super().__init__(channels * num_inputs, channels)
        self.fc = nn.Linear(channels, num_classes)
        init_he_fan_out(self)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``u``: B x (M·C) x H x W. Returns ``(logits B x K, fused map Φ B x C x H x W)``."""
        phi = self._stages(u)
        return self.fc(phi.mean(dim=(2, 3))), phi


class TransFusionDecoder(_DepthwisePointwise):
    """FFSD's leader decoder: C -> C depthwise 3x3 + BN + ReLU, 1x1 C -> M·C + BN + ReLU.

    Init as the CIFAR backbones' loop that creates it in the official code: convs N(0, sqrt(2/(k²·C_out))),
    BN 1/0.
    """

    def __init__(self, channels: int, num_outputs: int = 2) -> None:
        super().__init__(channels, channels * num_outputs)
        init_he_fan_out(self)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: B x C x H x W (the leader's deepest tap). Returns d_L: B x (M·C) x H x W."""
        return self._stages(x)
