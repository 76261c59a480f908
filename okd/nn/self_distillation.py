"""FFSD's self-distillation (SD) module G (``docs/methods.md#ffsd``, FFSD.2).

G is a stack of K-1 up-sampling blocks, ConvTranspose2d(k3, s2, p1, op1, no bias) -> BN -> ReLU, each doubling
the spatial size. Its channel list runs deep -> shallow, ``[C_K, C_{K-1}, ..., C_1]``; its outputs are
returned reversed, so ``G(x)[j]`` lines up with tap ``j + 1`` (shallow -> deep, taps 1..K-1).
Default PyTorch init (the official code sets none).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def generic_sd_channels(channels: int, num_blocks: int) -> list[int]:
    """The generic rule: C_out = floor(C_in / 2) at every block, from C_in = ``channels``.

    Returns the ``num_blocks + 1`` widths, deep -> shallow (e.g. 64, 2 -> [64, 32, 16]).
    """
    widths = [int(channels)]
    for _ in range(num_blocks):
        widths.append(widths[-1] // 2)
    return widths


def sd_channels_for(tap_channels: Sequence[int]) -> list[int]:
    """The SD channel list (deep -> shallow) for a backbone with these tap widths (shallow -> deep).

    The generic halving rule where it reproduces the taps (CIFAR ResNets, WRNs, ImageNet ResNets); otherwise
    the taps reversed, which gives the official hard-coded lists: DenseNet-40-12 (168, 312, 456) ->
    [456, 312, 168] and GoogLeNet (480, 832, 1024) -> [1024, 832, 480].
    """
    taps = [int(c) for c in tap_channels]
    if len(taps) < 2:
        raise ValueError(f"an SD module needs at least 2 taps, got tap_channels={list(tap_channels)}")
    generic = generic_sd_channels(taps[-1], len(taps) - 1)
    reversed_taps = taps[::-1]
    return generic if generic == reversed_taps else reversed_taps


class SelfDistillationModule(nn.Module):
    """G: K-1 transposed-conv blocks over the channel list ``channels`` (deep -> shallow, length K).

    ``forward(x)`` returns the K-1 block outputs shallow -> deep (output j lines up with tap j+1).
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError(f"an SD module needs a channel list of length >= 2, got {channels}")
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )
            for cin, cout in zip(channels[:-1], channels[1:], strict=True)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        outs.reverse()
        return outs
