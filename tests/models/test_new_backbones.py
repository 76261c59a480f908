"""The backbones of the heterogeneous tables (MCL, L-MCL, SwitOKD) against their published definitions:
exact parameter counts, MACs, taps, and the initialisation rules (``docs/models.md``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from okd.models import count_macs, count_parameters, create_model
from okd.models.hcgnet import GatedTransition, SMGLayer
from okd.models.shufflenetv2 import channel_shuffle
from okd.models.wide_resnet_crd import CRDWideBlock

# name: (params at K=100 or None, params at K=10 or None, MACs in millions as published, decimals of that
# figure, tap shapes C x H x W at 32 x 32)
SPEC = {
    "wrn16_2_crd": (703_284, None, 101.12, 2, [(32, 32, 32), (64, 16, 16), (128, 8, 8)]),
    "wrn40_2_crd": (2_255_156, None, 327.61, 2, [(32, 32, 32), (64, 16, 16), (128, 8, 8)]),
    "wrn28_4_crd": (5_872_180, None, 845.62, 2, [(64, 32, 32), (128, 16, 16), (256, 8, 8)]),
    "wrn16_1_switokd": (181_476, 175_626, 33.74, 2, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    "wrn16_2_switokd": (704_420, 692_810, 129.43, 2, [(32, 32, 32), (64, 16, 16), (128, 8, 8)]),
    "wrn16_8_switokd": (11_012_036, 10_965_866, 2001.1, 1, [(128, 32, 32), (256, 16, 16), (512, 8, 8)]),
    "wrn16_10_switokd": (17_179_940, None, 3120.0, 1, [(160, 32, 32), (320, 16, 16), (640, 8, 8)]),
    "shufflenetv2_x0_5": (444_292, None, 10.99, 2, [(48, 16, 16), (96, 8, 8), (1024, 4, 4)]),
    "shufflenetv2_x1_0": (1_356_104, None, 45.09, 2, [(116, 16, 16), (232, 8, 8), (1024, 4, 4)]),
    "mobilenetv2_x0_5": (812_836, 697_546, 6.52, 2, [(12, 16, 16), (16, 8, 8), (48, 4, 4), (1280, 2, 2)]),
    "mobilenetv1": (
        3_309_476,
        None,
        46.45,
        2,
        [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (1024, 2, 2)],
    ),
    "hcgnet_a1": (1_102_651, None, 154.67, 2, [(120, 32, 32), (252, 16, 16), (414, 8, 8)]),
    "hcgnet_a2": (3_133_679, None, 489.38, 2, [(240, 32, 32), (408, 16, 16), (716, 8, 8)]),
}
NAMES = list(SPEC)
# SwitOKD's CIFAR-10 pair: its MACs are published for the 10-way classifier
MACS_K = {"wrn16_1_switokd": 10, "wrn16_8_switokd": 10}
COUNTS = [(n, k, SPEC[n][i]) for n in NAMES for i, k in ((0, 100), (1, 10)) if SPEC[n][i] is not None]


def _x(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_all_registered():
    from okd.models import list_models

    assert set(NAMES) <= set(list_models())


@pytest.mark.parametrize(("name", "k", "params"), COUNTS, ids=[f"{n}-K{k}" for n, k, _ in COUNTS])
def test_parameter_count(name, k, params):
    model = create_model(name, k)
    assert count_parameters(model) == params
    assert model.num_classes == k


def _dilation_blind_excess(model: nn.Module) -> int:
    """MACs the reference counter adds: it sizes a conv's output as (H + 2p - k) // s + 1, ignoring dilation,
    so each dilated 3x3 (pad 2) is counted on an (H+2) x (W+2) map."""
    excess = 0

    def hook(m: nn.Conv2d, args: tuple, out: torch.Tensor) -> None:
        nonlocal excess
        if m.dilation == (1, 1):
            return
        h, w = args[0].shape[-2:]
        kh, kw = m.kernel_size
        blind = ((h + 2 * m.padding[0] - kh) // m.stride[0] + 1) * ((w + 2 * m.padding[1] - kw) // m.stride[1] + 1)
        per_position = m.out_channels * (m.in_channels // m.groups) * kh * kw
        excess += per_position * (blind - out.shape[-2] * out.shape[-1])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return excess


@pytest.mark.parametrize("name", NAMES)
def test_macs(name):
    """``count_macs`` runs and gives the published figure; for HCGNet the published figure comes from a counter
    that ignores dilation, and okd's true count plus exactly that excess rounds to it."""
    model = create_model(name, MACS_K.get(name, 100))
    macs = count_macs(model)
    _, _, published, decimals, _ = SPEC[name]
    excess = _dilation_blind_excess(model)
    assert (excess > 0) == name.startswith("hcgnet")
    assert round((macs + excess) / 1e6, decimals) == published
    if excess:
        assert round(macs / 1e6, 2) == {"hcgnet_a1": 154.27, "hcgnet_a2": 488.67}[name]


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_taps(name):
    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    x = _x()
    with torch.no_grad():
        logits = model(x)
        tap_logits, taps = model.forward_taps(x)
        pooled = model.fc(taps[-1].mean(dim=(2, 3)))
    assert logits.shape == (2, 10)
    torch.testing.assert_close(tap_logits, logits)
    assert [tuple(t.shape[1:]) for t in taps] == SPEC[name][4]
    assert tuple(t.shape[1] for t in taps) == model.tap_channels
    assert model.feature_dim == model.tap_channels[-1] == model.fc.in_features
    sides = [t.shape[-1] for t in taps]
    assert all(a == 2 * b for a, b in zip(sides, sides[1:], strict=False))  # each tap halves the resolution
    torch.testing.assert_close(pooled, logits)  # the deepest tap, pooled, is what the classifier reads


# --------------------------------------------------------------------------------------------- SwitOKD WRN


def _xavier_std(conv: nn.Conv2d, gain: float) -> float:
    k = conv.kernel_size[0] * conv.kernel_size[1]
    fan_in, fan_out = conv.in_channels // conv.groups * k, conv.out_channels * k
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def test_switokd_wrn_init():
    """Conv weights Xavier-uniform with gain sqrt 2 (not FFSD's He fan_out normal), conv biases 0, BN 1/0,
    Linear at PyTorch's default."""
    torch.manual_seed(0)
    model = create_model("wrn16_8_switokd", 10)
    conv = model.layer2[0].conv1  # 128 -> 256, 3x3: fan_in 1152, fan_out 2304
    std = _xavier_std(conv, math.sqrt(2.0))
    he = math.sqrt(2.0 / (9 * conv.out_channels))
    assert abs(he - std) > 0.1 * std  # the test tells the two rules apart
    w = conv.weight.detach()
    assert abs(w.std().item() - std) < 0.02 * std and abs(w.mean().item()) < 0.02 * std
    bound = std * math.sqrt(3.0)
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.99 * bound  # uniform, not normal
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.bias is not None and torch.all(m.bias == 0)
            assert abs(m.weight.std().item() - _xavier_std(m, math.sqrt(2.0))) < 0.2 * _xavier_std(m, math.sqrt(2.0))
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    fc_bound = 1 / math.sqrt(model.fc.in_features)
    assert model.fc.weight.abs().max() <= fc_bound and 0 < model.fc.bias.abs().max() <= fc_bound


def test_switokd_wrn16_2_is_ffsd_layout_with_its_own_init():
    torch.manual_seed(0)
    ours, ffsd = create_model("wrn16_2_switokd", 100), create_model("wrn16_2", 100)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ffsd.state_dict().items()}
    assert ours.bn1.momentum == 0.9
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in ours.modules())
    assert torch.all(ours.conv1.bias == 0) and ffsd.conv1.bias.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- CRD WRN


def test_crd_block_reads_the_preactivated_input():
    """A width-changing block feeds BN-ReLU(x) to both the 3x3 (stride on the first conv) and the 1x1 shortcut."""
    torch.manual_seed(0)
    block = CRDWideBlock(16, 32, stride=2).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        act = torch.relu(block.bn1(x))
        expected = block.conv2(torch.relu(block.bn2(block.conv1(act)))) + block.shortcut(act)
        torch.testing.assert_close(block(x), expected)
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    same = CRDWideBlock(32, 32).eval()
    y = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(same(y), y + same.conv2(torch.relu(same.bn2(same.conv1(torch.relu(same.bn1(y)))))))


def test_crd_wrn_init_and_layout():
    torch.manual_seed(0)
    model = create_model("wrn28_4_crd", 100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    conv = model.layer3[0].conv1  # 128 -> 256: fan_out and fan_in differ by 2x
    assert abs(conv.weight.std().item() - math.sqrt(2.0 / (9 * 256))) < 0.03 * math.sqrt(2.0 / (9 * 256))
    assert torch.all(model.fc.bias == 0)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.layer1[0].shortcut is not None  # 16 -> 64 already projects


# -------------------------------------------------------------------------------------------- ShuffleNetV2


def test_channel_shuffle_interleaves_two_groups():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x).flatten().tolist() == [0, 3, 1, 4, 2, 5]


def test_shufflenet_layout():
    model = create_model("shufflenetv2_x0_5", 100)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [len(s) for s in (model.stage1, model.stage2, model.stage3)] == [4, 8, 4]
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


# ---------------------------------------------------------------------------------------------- MobileNets


def test_mobilenetv2_init_and_layout():
    torch.manual_seed(0)
    model = create_model("mobilenetv2_x0_5", 100)
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())
    assert model.stem[0].stride == (2, 2)
    first = model.stages[0][0]
    assert first.conv[0].kernel_size == (1, 1) and first.conv[0].out_channels == 16  # expansion at t = 1
    assert first.conv[6].out_channels == 8 and not first.residual
    conv = model.head_conv[0]  # 160 -> 1280, 1x1
    assert abs(conv.weight.std().item() - math.sqrt(2.0 / 1280)) < 0.03 * math.sqrt(2.0 / 1280)
    assert abs(model.fc.weight.std().item() - 0.01) < 0.03 * 0.01 and torch.all(model.fc.bias == 0)
    assert all(
        torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    )


def test_mobilenetv1_init():
    """N(0, std 1/fan_in) on every conv and Linear weight, fan_in = C_in/groups x kh x kw; biases default."""
    torch.manual_seed(0)
    model = create_model("mobilenetv1", 100)
    pointwise = model.stages[3][9]  # the second 512-wide block: 512 -> 512 1x1
    depthwise = model.stages[4][0]  # 512-channel depthwise 3x3 (stride 2)
    assert isinstance(pointwise, nn.Conv2d) and pointwise.kernel_size == (1, 1)
    assert isinstance(depthwise, nn.Conv2d) and depthwise.groups == 512
    for layer, fan_in in ((pointwise, 512), (depthwise, 9), (model.fc, 1024), (model.stem[0], 27)):
        assert abs(layer.weight.std().item() - 1 / fan_in) < 0.1 / fan_in, layer
    assert 0 < model.fc.bias.abs().max() <= 1 / math.sqrt(1024)
    torch.manual_seed(0)
    plain = create_model("mobilenetv1", 100, init="torch")
    assert plain.stages[3][9].weight.std().item() > 5 / 512  # PyTorch's kaiming-uniform(a = sqrt 5) default


# ------------------------------------------------------------------------------------------------- HCGNet


def test_hcgnet_units():
    torch.manual_seed(0)
    layer, trans = SMGLayer(24, 12).eval(), GatedTransition(120, 60).eval()
    x = torch.randn(2, 24, 8, 8)
    with torch.no_grad():
        out = layer(x)
        assert out.shape == (2, 36, 8, 8)
        torch.testing.assert_close(out[:, :24], x)  # dense connectivity: the input passes through unchanged
        assert trans(torch.randn(2, 120, 8, 8)).shape == (2, 60, 4, 4)
    assert layer.conv.conv.groups == 4 and layer.update.path5.conv.dilation == (2, 2)
    assert trans.update.forget_bn.num_features == 15 and trans.update.select_bn.num_features == 30
