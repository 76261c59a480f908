"""RandAugment on uint8 batches (``okd.data.randaugment``): each op against Pillow's arithmetic written out by hand on
small images, the magnitudes of torchvision's defaults, and the per-image choice of ops."""

from __future__ import annotations

import math

import pytest
import torch

from okd.data import randaugment as randaugment_module
from okd.data.autoaugment import IMAGENET_POLICY, auto_augment, auto_augment_draws
from okd.data.randaugment import (
    OPS,
    SIGNED,
    apply_op,
    apply_where,
    magnitudes,
    op_magnitude,
    rand_augment,
    rand_augment_draws,
)


def img(seed: int = 0, n: int = 2, size: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.int64).to(torch.uint8)


def mags(value: float, n: int = 2) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.float64)


def test_torchvision_default_magnitudes():
    m = magnitudes((32, 32))
    assert m["identity"] == 0.0 and m["equalize"] == 0.0
    assert m["shear_x"] == pytest.approx(0.09) and m["rotate"] == pytest.approx(9.0)
    assert m["translate_x"] == pytest.approx(150 / 331 * 32 * 0.3) and int(m["translate_x"]) == 4
    assert m["brightness"] == pytest.approx(0.27) and m["solarize"] == pytest.approx(178.5)
    assert m["posterize"] == 7.0  # 8 - round(9 / 7.5)
    assert len(OPS) == 14 and len(SIGNED) == 9


def test_geometric_ops_map_pixel_centres_through_the_inverse_matrix():
    x = img(size=8)
    out = apply_op("translate_x", x, mags(4.35))  # whole pixels: int(4.35) = 4, content moves right
    assert torch.equal(out[..., 4:], x[..., :4]) and not out[..., :4].any()
    out = apply_op("translate_y", x, mags(-4.35))
    assert torch.equal(out[..., :4, :], x[..., 4:, :]) and not out[..., 4:, :].any()
    m = 0.3
    out = apply_op("shear_x", x, mags(m))  # x_in = x + m y about the corner (0, 0)
    for i in range(8):
        for j in range(8):
            src = math.floor(j + 0.5 + m * (i + 0.5))
            want = x[:, :, i, src] if src < 8 else torch.zeros_like(x[:, :, 0, 0])
            assert torch.equal(out[:, :, i, j], want)
    out = apply_op("shear_y", x, mags(-m))
    for i in range(8):
        for j in range(8):
            src = math.floor(i + 0.5 - m * (j + 0.5))
            want = x[:, :, src, j] if src >= 0 else torch.zeros_like(x[:, :, 0, 0])
            assert torch.equal(out[:, :, i, j], want)
    assert torch.equal(apply_op("rotate", x, mags(90.0)), torch.rot90(x, 1, dims=(2, 3)))


def test_geometry_uses_pillows_fixed_point_at_boundaries():
    """Shear x by float32(0.2) (bin 20 of 31): row 7's centre maps to 2.0 exactly in reals; Pillow's 16.16
    fixed point puts it just below (shift 1), where a float floor gives 2. Pillow's output of that row, as
    torchvision 0.29.1 with Pillow 13 returns it, on pixels valued 16 * column + row + 1."""
    cols = torch.arange(8).view(1, 8) * 16 + torch.arange(8).view(8, 1) + 1
    x = cols.to(torch.uint8).expand(1, 3, 8, 8)
    m = op_magnitude("shear_x", 20, 31, (8, 8))
    assert m == pytest.approx(0.2) and m != 0.2  # torchvision's float32 linspace value
    out = apply_op("shear_x", x, mags(m, 1))
    assert out[0, 0, 7].tolist() == [24, 40, 56, 72, 88, 104, 120, 0]
    assert out[0, 0, 2].tolist() == [19, 35, 51, 67, 83, 99, 115, 0]


def test_enhance_ops_blend_with_pillows_degenerate_images_and_truncate():
    x = img()
    f = 1.27
    assert torch.equal(apply_op("brightness", x, mags(0.27)), (x.double() * f).trunc().clamp(0, 255).to(torch.uint8))
    r, g, b = x.long().unbind(1)
    grey = ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).unsqueeze(1).double()
    blend = lambda d, k: (d + k * (x.double() - d)).trunc().clamp(0, 255).to(torch.uint8)  # noqa: E731
    torch.testing.assert_close(apply_op("color", x, mags(-0.27)), blend(grey, 0.73), rtol=0, atol=1)
    mean = (grey.mean((1, 2, 3), keepdim=True) + 0.5).floor()
    torch.testing.assert_close(apply_op("contrast", x, mags(0.27)), blend(mean, 1.27), rtol=0, atol=1)
    xs = x.double()
    smooth = xs.clone()
    for i in range(1, 5):
        for j in range(1, 5):
            smooth[:, :, i, j] = (
                (xs[:, :, i - 1 : i + 2, j - 1 : j + 2].sum((2, 3)) + 4 * xs[:, :, i, j]) / 13 + 0.5
            ).floor()
    torch.testing.assert_close(apply_op("sharpness", x, mags(0.27)), blend(smooth, 1.27), rtol=0, atol=1)


def test_lookup_table_ops():
    x = img()
    assert torch.equal(apply_op("posterize", x, mags(7.0), bits=7), x & 0xFE)
    assert torch.equal(apply_op("solarize", x, mags(178.5)), torch.where(x >= 179, 255 - x, x))
    lo = x.flatten(2).min(2).values.double()[..., None, None]
    hi = x.flatten(2).max(2).values.double()[..., None, None]
    scale = torch.full_like(hi, 255.0) / (hi - lo)
    assert torch.equal(apply_op("autocontrast", x, mags(0)), (x.double() * scale - lo * scale).trunc().to(torch.uint8))
    # Pillow's table: int(145 * 255 / 220 - 13 * 255 / 220) = int(153.00000000000003) = 153 (with 255 * (1 / 220): 152)
    edge = torch.tensor([13, 145, 233], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    assert apply_op("autocontrast", edge, mags(0, 1))[0, 0, 0].tolist() == [0, 153, 255]
    flat = torch.full((1, 3, 4, 4), 9, dtype=torch.uint8)
    assert torch.equal(apply_op("autocontrast", flat, mags(0, 1)), flat)  # hi == lo: unchanged
    assert torch.equal(apply_op("equalize", flat, mags(0, 1)), flat)  # one level: unchanged


def test_equalize_follows_pillows_lookup_table():
    x = img(3, n=1, size=8)
    out = apply_op("equalize", x, mags(0, 1))
    for c in range(3):
        values = x[0, c].flatten().tolist()
        h = [values.count(v) for v in range(256)]
        step = (len(values) - h[max(v for v in range(256) if h[v])]) // 255
        lut, acc = [], step // 2
        for v in range(256):
            lut.append(min(acc // step, 255) if step else v)
            acc += h[v]
        assert out[0, c].flatten().tolist() == [lut[v] for v in values]


def test_each_image_gets_its_own_ops_in_order():
    x = img(n=3)
    ops = torch.tensor([[0, 0], [OPS.index("posterize"), OPS.index("solarize")], [OPS.index("brightness"), 0]])
    negative = torch.tensor([[False, False], [True, True], [True, False]])
    out = rand_augment(x, ops, negative)
    assert torch.equal(out[0], x[0])
    p = x[1] & 0xFE
    assert torch.equal(out[1], torch.where(p >= 179, 255 - p, p))  # unsigned ops ignore the sign
    assert torch.equal(out[2], (x[2].double() * 0.73).trunc().to(torch.uint8))
    gen = torch.Generator().manual_seed(0)
    ops, negative = rand_augment_draws(gen, 4000)
    assert ops.shape == (4000, 2) and set(ops.unique().tolist()) == set(range(14))
    assert 0.45 < negative.float().mean() < 0.55


def test_auto_augment_applies_each_images_sub_policy_when_its_draws_pass():
    x = img(n=4)
    invert_then_equalize = IMAGENET_POLICY.index((("invert", 0.6, None), ("equalize", 1.0, None)))
    posterize_rotate = 0  # (posterize 0.4 bin 8 -> 4 bits, rotate 0.6 bin 9 -> 30 degrees)
    policy = torch.tensor([invert_then_equalize, invert_then_equalize, posterize_rotate, posterize_rotate])
    probs = torch.tensor([[0.5, 1.0], [0.7, 0.2], [0.4, 0.9], [0.9, 0.1]])
    negative = torch.tensor([[False, False], [False, False], [False, False], [False, True]])
    out = auto_augment(x, policy, probs, negative)
    eq = lambda t: apply_op("equalize", t[None], mags(0, 1))[0]  # noqa: E731
    assert torch.equal(out[0], eq(255 - x[0]))  # both ops pass (0.5 <= 0.6, 1.0 <= 1.0)
    assert torch.equal(out[1], eq(x[1]))  # 0.7 > 0.6: no invert
    assert torch.equal(out[2], x[2] & 0xF0)  # posterize to 4 bits; 0.9 > 0.6: no rotation
    assert torch.equal(out[3], apply_op("rotate", x[3:4], mags(-30.0, 1))[0])  # the sign draw negates the rotation
    policy, probs, negative = auto_augment_draws(torch.Generator().manual_seed(0), 5000)
    assert set(policy.unique().tolist()) == set(range(25)) and 0.45 < probs.mean() < 0.55


def test_the_subset_path_equals_the_whole_batch_path():
    """The CPU applies each op to its chosen images only; a GPU runs it on the whole batch and keeps the chosen."""
    x = img(5, n=6, size=8)
    chosen = torch.tensor([True, False, True, True, False, False])
    mag = torch.tensor([0.27, -0.27, 0.09, -0.09, 4.0, -9.0], dtype=torch.float64)
    base = 255 - x
    for op in (*OPS, "invert"):
        whole = apply_where(base, chosen, op, x, mag, 7, subset=False)
        assert torch.equal(whole, apply_where(base, chosen, op, x, mag, 7, subset=True)), op
        assert torch.equal(whole[~chosen], base[~chosen]), op
    assert torch.equal(apply_where(base, torch.zeros(6, dtype=torch.bool), "equalize", x, mag, 7, True), base)


@pytest.mark.parametrize("augmenter", ["rand_augment", "auto_augment"])
def test_on_the_cpu_each_op_runs_on_its_chosen_images_only(monkeypatch, augmenter):
    """A CPU batch takes the subset path: every op call gets only the images that chose it, never the whole batch."""
    sizes: list[int] = []
    real = apply_op

    def counting(op, x, mag, bits=7):
        sizes.append(x.shape[0])
        return real(op, x, mag, bits=bits)

    monkeypatch.setattr(randaugment_module, "apply_op", counting)
    x = img(7, n=8, size=8)
    gen = torch.Generator().manual_seed(3)
    if augmenter == "rand_augment":
        rand_augment(x, *rand_augment_draws(gen, 8))
    else:
        auto_augment(x, *auto_augment_draws(gen, 8))
    assert sizes and max(sizes) < 8 and sum(sizes) <= 2 * 8


#: AutoAugment's ImageNet policy as published (Cubuk et al. 2019, Table 9; torchvision's AutoAugmentPolicy.IMAGENET):
#: 25 sub-policies of two (op, probability, magnitude bin of 10)
PUBLISHED_IMAGENET_POLICY = """
posterize .4 8, rotate .6 9 | solarize .6 5, autocontrast .6 - | equalize .8 -, equalize .6 - |
posterize .6 7, posterize .6 6 | equalize .4 -, solarize .2 4 | equalize .4 -, rotate .8 8 |
solarize .6 3, equalize .6 - | posterize .8 5, equalize 1 - | rotate .2 3, solarize .6 8 |
equalize .6 -, posterize .4 6 | rotate .8 8, color .4 0 | rotate .4 9, equalize .6 - |
equalize 0 -, equalize .8 - | invert .6 -, equalize 1 - | color .6 4, contrast 1 8 |
rotate .8 8, color 1 2 | color .8 8, solarize .8 7 | sharpness .4 7, invert .6 - |
shear_x .6 5, equalize 1 - | color .4 0, equalize .6 - | equalize .4 -, solarize .2 4 |
solarize .6 5, autocontrast .6 - | invert .6 -, equalize 1 - | color .6 4, contrast 1 8 |
equalize .8 -, equalize .6 -
"""


def test_the_auto_augment_table_is_the_published_imagenet_policy():
    def op(text: str) -> tuple:
        name, p, m = text.split()
        return name, float(p), None if m == "-" else int(m)

    published = [tuple(op(o) for o in sub.split(",")) for sub in PUBLISHED_IMAGENET_POLICY.split("|")]
    assert len(published) == 25 and list(IMAGENET_POLICY) == published


def test_rotation_turns_a_non_square_image_about_its_own_centre():
    """180 degrees about (W/2, H/2) maps every pixel centre of an even-sized image onto its mirror: a flip of both
    axes, for a 4 x 6 image as for a square one."""
    x = img(3, n=2, size=6)[:, :, :4, :]
    assert torch.equal(apply_op("rotate", x, mags(180.0)), torch.flip(x, dims=(2, 3)))
