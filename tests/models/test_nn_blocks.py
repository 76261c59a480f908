"""FFSD's building blocks: fusion module, TransFusion decoder, SD module, diversity target / loss / Ψ."""

from __future__ import annotations

import math
from fractions import Fraction

import helpers
import pytest
import torch

from okd.models import count_macs, count_parameters, create_model, list_models
from okd.nn.diversity import (
    diversity_feature_target,
    diversity_k,
    diversity_loss,
    diversity_target,
    l2_diversity_loss,
)
from okd.nn.fusion import FusionModule, TransFusionDecoder
from okd.nn.self_distillation import SelfDistillationModule, generic_sd_channels, sd_channels_for

# ------------------------------------------------------------------------------------------------------------
# models.md §12: (deepest C, H, tap_channels, num_classes,
#                 fusion params/MACs, decoder params/MACs, one SD module params/MACs), M = 2
AUX = {
    "resnet": (64, 8, (16, 32, 64), 100, 16_228, 0.60, 9_152, 0.56, 23_136, 2.36),
    "wrn": (128, 8, (32, 64, 128), 100, 48_740, 2.26, 34_688, 2.17, 92_352, 9.44),
    "densenet": (456, 8, (168, 312, 456), 100, 472_516, 27.19, 422_712, 26.88, 1_753_152, 202.72),
    "googlenet": (1024, 8, (480, 832, 1024), 100, 2_224_228, 135.50, 2_112_512, 134.81, 11_264_576, 1410.86),
    "imagenet_resnet": (512, 7, (64, 128, 256, 512), 1000, 1_049_576, 26.65, 531_968, 25.92, 1_549_184, 173.41),
}


@pytest.mark.parametrize("family", list(AUX))
def test_aux_module_params_and_macs_match_models_md(family):
    c, h, taps, k, f_p, f_m, d_p, d_m, s_p, s_m = AUX[family]
    fusion, decoder = FusionModule(c, k, num_inputs=2), TransFusionDecoder(c, num_outputs=2)
    sd = SelfDistillationModule(sd_channels_for(taps))
    assert count_parameters(fusion) == f_p
    assert count_parameters(decoder) == d_p
    assert count_parameters(sd) == s_p
    assert count_macs(fusion, (1, 2 * c, h, h)) / 1e6 == pytest.approx(f_m, abs=0.005)
    assert count_macs(decoder, (1, c, h, h)) / 1e6 == pytest.approx(d_m, abs=0.005)
    assert count_macs(sd, (1, c, h, h)) / 1e6 == pytest.approx(s_m, abs=0.005)


def test_sd_channel_rules_reproduce_the_official_lists():
    assert generic_sd_channels(64, 2) == [64, 32, 16]
    assert generic_sd_channels(512, 3) == [512, 256, 128, 64]
    assert sd_channels_for((16, 32, 64)) == [64, 32, 16]  # CIFAR ResNets: generic rule
    assert sd_channels_for((32, 64, 128)) == [128, 64, 32]  # WRN-x-2: generic rule
    assert sd_channels_for((168, 312, 456)) == [456, 312, 168]  # DenseNet-40-12: official hard-coded list
    assert sd_channels_for((480, 832, 1024)) == [1024, 832, 480]  # GoogLeNet: official hard-coded list
    assert sd_channels_for((16, 32)) == [32, 16]  # two taps: the smallest SD module (one block)
    with pytest.raises(ValueError, match="at least 2 taps"):
        sd_channels_for((64,))


EXPECTED_SD = {
    "resnet20": [64, 32, 16],
    "resnet32": [64, 32, 16],
    "resnet56": [64, 32, 16],
    "wrn16_2": [128, 64, 32],
    "wrn40_2": [128, 64, 32],
    "densenet40_12": [456, 312, 168],
    "googlenet": [1024, 832, 480],
}


@pytest.mark.parametrize("name", list(EXPECTED_SD))
def test_sd_outputs_match_each_backbones_taps(name):
    if name not in list_models():
        pytest.skip(f"{name} is not registered yet")
    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    assert sd_channels_for(model.tap_channels) == EXPECTED_SD[name]
    with torch.no_grad():
        _, taps = model.forward_taps(torch.randn(1, 3, 32, 32))
        outs = SelfDistillationModule(sd_channels_for(model.tap_channels)).eval()(taps[-1])
        assert [o.shape for o in outs] == [t.shape for t in taps[:-1]]
        c = taps[-1].shape[1]
        assert FusionModule(c, 10, 2).eval()(torch.cat([taps[-1]] * 2, 1))[1].shape == taps[-1].shape
        assert TransFusionDecoder(c, 2).eval()(taps[-1]).shape[1] == 2 * c


def test_sd_module_outputs_align_with_taps():
    torch.manual_seed(0)
    sd = SelfDistillationModule([64, 32, 16]).eval()
    x = torch.randn(2, 64, 8, 8)
    outs = sd(x)
    assert [tuple(o.shape) for o in outs] == [(2, 16, 32, 32), (2, 32, 16, 16)]  # taps 1, 2 (shallow first)
    first = sd.blocks[0](x)
    torch.testing.assert_close(outs[1], first)  # the first (deepest) block's output is last after reversal
    torch.testing.assert_close(outs[0], sd.blocks[1](first))
    conv = sd.blocks[0][0]
    assert isinstance(conv, torch.nn.ConvTranspose2d) and conv.bias is None
    assert (conv.kernel_size, conv.stride, conv.padding, conv.output_padding) == ((3, 3), (2, 2), (1, 1), (1, 1))


def test_fusion_module_forward_and_init():
    torch.manual_seed(0)
    fusion = FusionModule(64, 10, num_inputs=2)
    u = torch.randn(8, 128, 8, 8)
    logits, phi = fusion(u)
    assert logits.shape == (8, 10) and phi.shape == (8, 64, 8, 8)
    assert (phi >= 0).all()  # Φ is the output of the second ReLU
    torch.testing.assert_close(logits, fusion.fc(phi.mean(dim=(2, 3))))
    assert fusion.conv1.groups == 128 and fusion.conv1.bias is None and fusion.conv2.bias is None
    # N(0, sqrt(2 / (k*k*C_out))): depthwise 9*128, pointwise 1*64
    assert fusion.conv1.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 128)), rel=0.1)
    assert fusion.conv2.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.1)
    for bn in (fusion.bn1, fusion.bn2):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    # nothing detached inside: gradient reaches the input (FFL feeds it non-detached features)
    u.requires_grad_(True)
    fusion(u)[0].sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_transfusion_decoder_forward_and_init():
    torch.manual_seed(0)
    dec = TransFusionDecoder(64, num_outputs=3)
    out = dec(torch.randn(4, 64, 8, 8))
    assert out.shape == (4, 192, 8, 8) and (out >= 0).all()
    assert dec.conv1.groups == 64 and dec.conv2.out_channels == 192
    assert dec.conv1.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.15)
    assert dec.conv2.weight.std().item() == pytest.approx(math.sqrt(2 / 192), rel=0.1)


def test_smallest_sd_module_and_attention_map_shape():
    from okd.nn.losses import attention_map

    sd = SelfDistillationModule([8, 4])  # two taps: one up-sampling block
    assert [tuple(o.shape) for o in sd(torch.randn(2, 8, 4, 4))] == [(2, 4, 8, 8)]
    with pytest.raises(ValueError, match="length >= 2"):
        SelfDistillationModule([8])
    f = torch.randn(2, 3, 4, 5)
    att = attention_map(f)
    assert att.shape == (2, 1, 4, 5)  # B x 1 x H x W
    torch.testing.assert_close(att, (f**2).mean(1, keepdim=True))


def test_batchnorm_of_fusion_decoder_and_sd_modules_uses_momentum_0_1():
    torch.manual_seed(0)
    assert helpers.assert_bn_updates_with_momentum_0_1(FusionModule(8, 10, num_inputs=2), torch.randn(4, 16, 4, 4)) == 2
    assert (
        helpers.assert_bn_updates_with_momentum_0_1(TransFusionDecoder(8, num_outputs=2), torch.randn(4, 8, 4, 4)) == 2
    )
    assert helpers.assert_bn_updates_with_momentum_0_1(SelfDistillationModule([8, 4, 2]), torch.randn(4, 8, 2, 2)) == 2


# ------------------------------------------------------------------------------------------------------------
# Diversity, worked by hand on a 1x1x3x3 attention map y = [1, 2, 3, 4, 5, 6, 7, 8, 50]:
#   n = ||y|| = sqrt(1+4+9+16+25+36+49+64+2500) = sqrt(2704) = 52, ŷ = y / 52,
#   N = 9, k = floor(9/3) = 3, τ = 3rd smallest ŷ = 3/52.
#   t = (n/2 - ŷ)·sign(ŷ - τ) + n/2:
#     y = 1, 2  (ŷ < τ):  t = ŷ             = 1/52, 2/52           (kept)
#     y = 3     (ŷ = τ):  t = n/2           = 26                   (sign(0) = 0)
#     y >= 4    (ŷ > τ):  t = n - ŷ         = 52 - y/52            (flipped, on the raw-norm scale)
#   With x = ones(9): x̂ = 1/3 everywhere, D = (1/9) Σ (1/3 - t)^2 = 14887909/8112 ≈ 1835.29 (huge: t is not
#   re-normalised, which is the official arithmetic).
Y_VALUES = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 50.0]


def _hand_target() -> list[Fraction]:
    out = []
    for y in Y_VALUES:
        y_hat = Fraction(int(y), 52)
        out.append(y_hat if y < 3 else Fraction(26) if y == 3 else 52 - y_hat)
    return out


def test_diversity_k():
    assert diversity_k(64) == 21 and diversity_k(49) == 16 and diversity_k(9) == 3 and diversity_k(2) == 1


def test_diversity_target_by_hand():
    y = torch.tensor(Y_VALUES, dtype=torch.float64).view(1, 1, 3, 3)
    t, y_hat, n = diversity_target(y)
    assert n.item() == pytest.approx(52.0)
    torch.testing.assert_close(y_hat.double(), (y / 52).view(1, 9), rtol=1e-6, atol=1e-7)
    expected = torch.tensor([[float(v) for v in _hand_target()]], dtype=torch.float32)
    torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-6)


def test_diversity_loss_by_hand():
    y = torch.tensor(Y_VALUES).view(1, 1, 3, 3)
    x = torch.ones(1, 1, 3, 3)
    hand = sum((Fraction(1, 3) - t) ** 2 for t in _hand_target()) / 9
    assert hand == Fraction(14887909, 8112)
    assert diversity_loss(x, y, detach_target=True).item() == pytest.approx(float(hand), rel=1e-6)


def test_diversity_ties_at_threshold_give_half_norm():
    # y = [1,1,1,1,2,2,2,2,4]: n = sqrt(4 + 16 + 16) = 6, τ = 1/6 (3rd smallest); the four ties at τ get
    # t = n/2 = 3, the 2s get 6 - 1/3, the 4 gets 6 - 2/3; nothing lies below τ.
    y = torch.tensor([1.0, 1, 1, 1, 2, 2, 2, 2, 4]).view(1, 1, 3, 3)
    t, _, _ = diversity_target(y)
    expected = torch.tensor([[3.0, 3, 3, 3, 6 - 1 / 3, 6 - 1 / 3, 6 - 1 / 3, 6 - 1 / 3, 6 - 2 / 3]])
    torch.testing.assert_close(t, expected)


def test_diversity_is_per_sample():
    y = torch.tensor(Y_VALUES).view(1, 1, 3, 3)
    batch = torch.cat([y, 2 * y.flip(-1)])  # second sample: another scale and order
    t, _, n = diversity_target(batch)
    torch.testing.assert_close(n.view(-1), torch.tensor([52.0, 104.0]))
    torch.testing.assert_close(t[0], diversity_target(y)[0][0])
    torch.testing.assert_close(t[1], diversity_target(2 * y.flip(-1))[0][0])


def test_diversity_loss_gradient_and_detach():
    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    y = torch.rand(2, 1, 4, 4, requires_grad=True)
    diversity_loss(x, y, detach_target=True).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert y.grad is None


def test_diversity_feature_target_by_hand():
    # Y: 1 x C x 3 x 3 with C = 2 identical channels sqrt(y), so att(Y) = y, n = 52, Δ = t - ŷ,
    # Ψ = Y + Δ·n/C = Y + 26·Δ:
    #   y = 1, 2: Δ = 0                     -> Ψ = sqrt(y)
    #   y = 3:    Δ = 26 - 3/52             -> Ψ = sqrt(3) + 676 - 1.5 = sqrt(3) + 674.5
    #   y >= 4:   Δ = 52 - 2y/52            -> Ψ = sqrt(y) + 1352 - y
    base = torch.tensor(Y_VALUES, dtype=torch.float64).sqrt().view(1, 1, 3, 3)
    feats = torch.cat([base, base], dim=1)
    psi = diversity_feature_target(feats)
    hand = [math.sqrt(y) + (0.0 if y < 3 else 674.5 if y == 3 else 1352.0 - y) for y in Y_VALUES]
    expected = torch.tensor(hand, dtype=psi.dtype).view(1, 1, 3, 3).expand(1, 2, 3, 3)
    torch.testing.assert_close(psi, expected, rtol=1e-5, atol=1e-4)
    # with one channel the shift is C = 2 times larger
    psi1 = diversity_feature_target(base)
    torch.testing.assert_close(psi1 - base.float(), 2 * (psi[:, :1] - base.float()), rtol=1e-5, atol=1e-3)


def test_l2_diversity_by_hand():
    # one channel: att = square. a = [sqrt3, 2] -> att [3, 4] -> [0.6, 0.8]; b = [2, sqrt3] -> [0.8, 0.6];
    # NL2 = mean(0.2^2, 0.2^2) = 0.04 per map, two maps: -0.08
    a = torch.tensor([math.sqrt(3), 2.0]).view(1, 1, 1, 2)
    b = torch.tensor([2.0, math.sqrt(3)]).view(1, 1, 1, 2)
    assert l2_diversity_loss([a, a], [b, b], detach_target=True).item() == pytest.approx(-0.08, rel=1e-5)


def test_l2_diversity_refuses_unpaired_maps():
    """One previous map per current map: a list of the wrong length is refused, counting both."""
    a = torch.ones(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"^2 current maps but 1 previous maps$"):
        l2_diversity_loss([a, a], [a], detach_target=True)


def test_l2_diversity_detach_keeps_gradient_from_the_previous_maps():
    """With ``detach_target`` no gradient reaches the previous student's maps; without it, it does."""
    cur = [torch.rand(2, 3, 4, 4, requires_grad=True) for _ in range(2)]
    prev = [torch.rand(2, 3, 4, 4, requires_grad=True) for _ in range(2)]
    l2_diversity_loss(cur, prev, detach_target=True).backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in cur)
    assert all(p.grad is None for p in prev)
    l2_diversity_loss(cur, prev, detach_target=False).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prev)


def test_a_ramp_up_of_length_zero_is_off():
    from okd.nn.losses import ramped_kl_weight, sigmoid_rampup

    assert sigmoid_rampup(0, 0) == 1.0 and sigmoid_rampup(7, 0) == 1.0
    assert sigmoid_rampup(0, 4) == pytest.approx(math.exp(-5)) and sigmoid_rampup(2, 4) == pytest.approx(
        math.exp(-1.25)
    )
    assert sigmoid_rampup(-3, 4) == pytest.approx(math.exp(-5)) and sigmoid_rampup(9, 4) == 1.0
    params = type("P", (), {"kl_weight": 2.0, "rampup_length": 0})()
    assert ramped_kl_weight(params, 0) == {"kl_weight": 2.0}
