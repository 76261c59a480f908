"""Named per-view augmentations (OKDPH's ``transes``): each network of a cohort sees its own kind of view.

Every view but ``base`` starts with the loader's random crop (``data.pad``, ``data.padding_mode``); then:

- ``hflip``: horizontal flip with probability 1/2;
- ``hflip+rot``: the flip, then a rotation by an angle uniform in [-15, 15] degrees about the image centre,
  nearest-neighbour, zero fill (torchvision's ``RandomRotation(15)`` on PIL images);
- ``cutout``: the flip, then one 16 x 16 hole (centre uniform over the pixel grid, clipped at the borders) set to
  raw pixel 0, i.e. before normalisation;
- ``augment``: no flip; torchvision's ``RandAugment()`` with its defaults (:mod:`okd.data.randaugment`);
- ``auto_aug``: no flip; torchvision's ``AutoAugment()``, ImageNet policy (:mod:`okd.data.autoaugment`);
- ``base``: no crop and no flip, normalisation only.

All ops run on uint8 batches on the loader's device; their draws come from the loader's per-epoch generator, so
a resumed run sees the same views.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from okd.data.autoaugment import auto_augment_draws
from okd.data.randaugment import affine_matrix, affine_nearest, rand_augment_draws
from okd.errors import ConfigError


@dataclass(frozen=True)
class ViewKind:
    """What one named view does after (optionally) the random crop."""

    crop: bool = True
    flip: bool = True
    rotate: float = 0.0  # max |angle| in degrees (0: none)
    cutout: int = 0  # side of the square hole (0: none)
    randaugment: bool = False  # torchvision's RandAugment() defaults (okd.data.randaugment)
    autoaugment: bool = False  # torchvision's AutoAugment() defaults, ImageNet policy (okd.data.autoaugment)


VIEW_KINDS: dict[str, ViewKind] = {
    "hflip": ViewKind(),
    "hflip+rot": ViewKind(rotate=15.0),
    "cutout": ViewKind(cutout=16),
    "augment": ViewKind(flip=False, randaugment=True),
    "auto_aug": ViewKind(flip=False, autoaugment=True),
    "base": ViewKind(crop=False, flip=False),
}


def check_view_names(names: Sequence[str], where: str) -> None:
    """Raise a :class:`ConfigError` naming ``where`` for any view okd cannot produce."""
    for name in names:
        if name not in VIEW_KINDS:
            raise ConfigError(f"{where}: unknown view {name!r}; choose from {', '.join(VIEW_KINDS)}")


def view_draws(gen: torch.Generator, views: int, n: int, size: tuple[int, int]) -> dict[str, Tensor]:
    """Per view and image, drawn on the CPU after the crop and flip draws: ``angles``, a rotation fraction uniform
    in [-1, 1) (views x n); ``centres``, a cutout centre (views x n x 2, row and column uniform over the grid);
    ``ops`` and ``negative``, RandAugment's two op indices and sign flags (views x n x 2 each); ``policy``,
    ``probs`` and ``policy_negative``, AutoAugment's sub-policy (views x n), op draws and signs (views x n x 2)."""
    angles = torch.rand((views, n), generator=gen, dtype=torch.float64) * 2 - 1
    rows = torch.randint(0, size[0], (views, n, 1), generator=gen)
    cols = torch.randint(0, size[1], (views, n, 1), generator=gen)
    ops, negative = rand_augment_draws(gen, views * n)
    policy, probs, signs = auto_augment_draws(gen, views * n)
    return {
        "policy": policy.view(views, n),
        "probs": probs.view(views, n, 2),
        "policy_negative": signs.view(views, n, 2),
        "angles": angles,
        "centres": torch.cat([rows, cols], dim=2),
        "ops": ops.view(views, n, -1),
        "negative": negative.view(views, n, -1),
    }


def rotate_nearest(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image of a uint8 batch counter-clockwise by ``degrees`` (b) about its centre, nearest, zero fill:
    Pillow's ``rotate`` (its affine map of pixel centres, in its fixed-point arithmetic)."""
    return affine_nearest(x, affine_matrix("rotate", degrees.to(torch.float64), (x.shape[2], x.shape[3])))


def cutout(x: Tensor, centres: Tensor, size: int) -> Tensor:
    """Zero rows [y - size/2, y + size/2) and columns [x - size/2, x + size/2) of each image (centres b x 2),
    clipped to the image."""
    b, _, h, w = x.shape
    half = size // 2
    y, xc = centres[:, :1], centres[:, 1:]
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    in_rows = (rows >= y - half) & (rows < y + half)
    in_cols = (cols >= xc - half) & (cols < xc + half)
    hole = in_rows.view(b, 1, h, 1) & in_cols.view(b, 1, 1, w)
    return x * ~hole
