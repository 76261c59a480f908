"""Named per-view augmentations (``okd.data.views``): each op on hand-made images, and the loader's named views."""

from __future__ import annotations

import pytest
import torch

from okd.data.device_loader import DeviceLoader
from okd.data.views import check_view_names, cutout, rotate_nearest, view_draws
from okd.errors import ConfigError


def images(n: int = 2, size: int = 8) -> torch.Tensor:
    return (
        torch.arange(n * 3 * size * size, dtype=torch.int64)
        .remainder(251)
        .add(1)
        .to(torch.uint8)
        .view(n, 3, size, size)
    )


def test_rotation_by_zero_and_by_right_angles_is_exact():
    x = images()
    assert torch.equal(rotate_nearest(x, torch.zeros(2)), x)
    # counter-clockwise on the screen (rows grow downwards): the right column comes to the top
    assert torch.equal(rotate_nearest(x, torch.full((2,), 90.0)), torch.rot90(x, 1, dims=(2, 3)))
    assert torch.equal(rotate_nearest(x, torch.full((2,), -90.0)), torch.rot90(x, -1, dims=(2, 3)))


def test_rotation_fills_the_uncovered_corners_with_zero_and_keeps_the_centre():
    x = torch.full((1, 1, 8, 8), 200, dtype=torch.uint8)
    out = rotate_nearest(x, torch.tensor([45.0]))
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 7, 7] == 0  # corners come from outside the image
    assert (out[0, 0, 3:5, 3:5] == 200).all()


def test_cutout_zeroes_one_clipped_square():
    x = images(2, 32)
    out = cutout(x, torch.tensor([[10, 20], [0, 31]]), 16)
    hole = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    hole[0, :, 2:18, 12:28] = True  # rows [10 - 8, 10 + 8), columns [20 - 8, 20 + 8)
    hole[1, :, 0:8, 23:32] = True  # clipped at the top and the right
    assert torch.equal(out, torch.where(hole, torch.zeros_like(x), x))


def test_view_names_are_checked():
    check_view_names(["hflip", "hflip+rot", "cutout", "augment", "auto_aug", "base"], "method.views")
    with pytest.raises(ConfigError, match="unknown view 'flip'"):
        check_view_names(["flip"], "method.views")


def loader(view_augs, seed: int = 3) -> DeviceLoader:
    x = images(6, 32)
    return DeviceLoader(
        x, torch.arange(6), 3, mean=[0.0] * 3, std=[1.0] * 3, train=True, padding_mode="zeros", seed=seed,
        views=len(view_augs), view_augs=view_augs, dtype=torch.float64,
    )  # fmt: skip


def test_named_views_are_drawn_per_epoch_and_per_view():
    names = ["hflip", "hflip+rot", "cutout", "base", "augment", "auto_aug"]
    a = loader(names)
    a.set_epoch(2)
    first = list(a)
    a.set_epoch(2)
    again = list(a)
    for (xs, y), (xs2, y2) in zip(first, again, strict=True):
        assert torch.equal(y, y2) and all(torch.equal(u, v) for u, v in zip(xs, xs2, strict=True))
    raw = images(6, 32).double() / 255
    for xs, y in first:
        assert len(xs) == 6
        torch.testing.assert_close(xs[3], raw[y], rtol=0, atol=1e-6)  # base: no crop, no flip, normalisation only
        assert not torch.equal(xs[0], xs[1])
        assert ((xs[2] == 0).flatten(1).sum(1) >= 16 * 16 * 3 // 4).all()  # the hole (at least a clipped quarter)
    with pytest.raises(ValueError, match="names 2 views"):
        DeviceLoader(images(2, 32), torch.arange(2), 2, mean=[0] * 3, std=[1] * 3, train=True, views=3,
                     view_augs=["hflip", "base"])  # fmt: skip


def test_cutout_centres_range_over_the_rows_and_the_columns_of_a_non_square_image():
    draws = view_draws(torch.Generator().manual_seed(0), views=2, n=500, size=(4, 40))
    centres = draws["centres"]
    assert centres.shape == (2, 500, 2)
    assert centres[..., 0].min() == 0 and centres[..., 0].max() == 3
    assert centres[..., 1].min() == 0 and centres[..., 1].max() == 39
    assert draws["angles"].shape == (2, 500) and -1 <= draws["angles"].min() and draws["angles"].max() < 1
    assert draws["angles"].min() < -0.9 and draws["angles"].max() > 0.9
