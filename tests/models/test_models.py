"""The CIFAR model zoo against ``models.md``: counts, taps, initialisation and the interface contract."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from okd.errors import ConfigError
from okd.models import count_macs, count_parameters, create_model, list_models
from okd.models.registry import MODELS

# name: (params K=100, params K=10 or None when the spec gives none, MACs in millions, tap shapes C,H,W)
SPEC = {
    "resnet20": (278_324, 272_474, 40.82, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    "resnet32": (472_756, 466_906, 69.13, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    "resnet56": (861_620, 855_770, 125.75, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    "resnet110": (1_736_564, 1_730_714, 253.16, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    "resnet110_bottleneck": (1_170_868, 1_147_738, 167.45, [(64, 32, 32), (128, 16, 16), (256, 8, 8)]),
    "wrn20_8": (6_871_220, 6_848_090, 1022.83, [(64, 32, 32), (128, 16, 16), (256, 8, 8)]),
    "wrn16_2": (704_420, None, 129.43, [(32, 32, 32), (64, 16, 16), (128, 8, 8)]),
    "wrn40_2": (2_258_084, None, 355.92, [(32, 32, 32), (64, 16, 16), (128, 8, 8)]),
    "densenet40_12": (1_100_428, None, 282.96, [(168, 32, 32), (312, 16, 16), (456, 8, 8)]),
    "densenet40_12_bc": (188_092, 176_122, 72.38, [(96, 32, 32), (120, 16, 16), (132, 8, 8)]),
    "googlenet": (6_258_500, None, 1521.85, [(480, 32, 32), (832, 16, 16), (1024, 8, 8)]),
    "vgg16": (15_299_748, 15_253_578, 313.77, [(256, 4, 4), (512, 2, 2), (512, 1, 1)]),
}
CIFAR = sorted(SPEC)
ALL = list_models()


def _input(name: str, batch: int = 2) -> torch.Tensor:
    size = MODELS.info(name).get("input_size", (3, 32, 32))
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_spec_models_registered():
    assert set(CIFAR) <= set(ALL)


@pytest.mark.parametrize("name", CIFAR)
def test_parameter_counts(name):
    p100, p10, _, _ = SPEC[name]
    m100, m10 = create_model(name, 100), create_model(name, 10)
    assert count_parameters(m100) == p100
    d = m100.feature_dim
    assert count_parameters(m10) == p100 + (10 - 100) * (d + 1)
    if p10 is not None:
        assert count_parameters(m10) == p10


@pytest.mark.parametrize("name", CIFAR)
def test_mac_counts(name):
    """models.md gives MACs in millions to two decimals: the count rounds to exactly that figure."""
    macs = count_macs(create_model(name, 100))
    assert round(macs / 1e6, 2) == SPEC[name][2]


@pytest.mark.parametrize("name", CIFAR)
def test_tap_shapes(name):
    model = create_model(name, 10)
    logits, taps = model.forward_taps(_input(name))
    assert logits.shape == (2, 10)
    assert [tuple(t.shape[1:]) for t in taps] == SPEC[name][3]


@pytest.mark.parametrize("name", ALL)
def test_interface(name):
    torch.manual_seed(0)
    model = create_model(name, 7).eval()
    assert model.num_classes == 7
    x = _input(name)
    with torch.no_grad():
        logits, taps = model.forward_taps(x)
        plain = model(x)
    assert isinstance(model.tap_channels, tuple)
    assert tuple(t.shape[1] for t in taps) == model.tap_channels
    assert taps[-1].shape[1] == model.feature_dim
    assert logits.shape == (2, 7)
    torch.testing.assert_close(plain, logits)
    assert _no_hooks(model)


@pytest.mark.parametrize("name", ALL)
def test_no_leaked_state_and_backward(name):
    """Two calls give independent outputs; taps are not modified in place (autograd would complain)."""
    model = create_model(name, 5).train()
    x1, x2 = _input(name), _input(name) + 1.0
    logits1, taps1 = model.forward_taps(x1)
    kept = [t.detach().clone() for t in (logits1, *taps1)]
    logits2, taps2 = model.forward_taps(x2)
    for a, b in zip(kept, (logits1, *taps1), strict=True):
        torch.testing.assert_close(a, b.detach())
    assert all(a is not b for a, b in zip(taps1, taps2, strict=True))
    loss = logits1.sum() + sum(t.mean() for t in taps1) + logits2.sum()
    loss.backward()
    unreached = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unreached, f"no gradient reaches {unreached[:5]}"
    model.eval()
    with torch.no_grad():
        again = model.forward_taps(x1)
        twice = model.forward_taps(x1)
    for a, b in zip((again[0], *again[1]), (twice[0], *twice[1]), strict=True):
        torch.testing.assert_close(a, b)


def test_unknown_model_lists_names():
    with pytest.raises(ConfigError, match="resnet32") as info:
        create_model("nope", 10)
    assert "nope" in str(info.value)


# ----------------------------------------------------------------------------------------- initialisation


def _std_ok(w: torch.Tensor, expected: float, rel: float = 0.05) -> bool:
    return abs(w.std().item() - expected) < rel * expected and abs(w.mean().item()) < 0.05 * expected


@pytest.mark.parametrize("name", CIFAR)
def test_bn_init(name):
    bns = [m for m in create_model(name, 10).modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


@pytest.mark.parametrize(
    "name", ["resnet32", "resnet110_bottleneck", "wrn20_8", "wrn16_2", "densenet40_12", "googlenet"]
)
def test_conv_he_fan_out_init(name):
    """N(0, sqrt(2 / (k*k*C_out))) on the largest conv and on the largest conv whose C_in != C_out, where
    fan-out and fan-in differ (by 2x or more: a fan-in init would be off by a factor sqrt(2) or more)."""
    torch.manual_seed(0)
    model = create_model(name, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    largest = max(convs, key=lambda m: m.weight.numel())
    widening = max((m for m in convs if m.in_channels != m.out_channels), key=lambda m: m.weight.numel())
    assert max(widening.in_channels, widening.out_channels) >= 2 * min(widening.in_channels, widening.out_channels)
    for conv in (largest, widening):
        k = conv.kernel_size[0] * conv.kernel_size[1]
        assert _std_ok(conv.weight, math.sqrt(2.0 / (k * conv.out_channels))), (conv, conv.weight.std())


def test_resnet_linear_default_init():
    fc = create_model("resnet32", 100).fc
    bound = 1 / math.sqrt(fc.in_features)
    assert fc.weight.abs().max() <= bound and fc.bias.abs().max() <= bound
    assert fc.bias.abs().sum() > 0


def test_wrn_quirks():
    model = create_model("wrn16_2", 10)
    assert model.bn1.momentum == 0.9
    others = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m is not model.bn1]
    assert all(m.momentum == 0.1 for m in others)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    assert model.layer1[0].conv1.bias.abs().sum() > 0  # PyTorch default bias init, not zero
    assert model.layer2[0].conv1.stride == (1, 1) and model.layer2[0].conv2.stride == (2, 2)


def test_densenet_bc_init():
    torch.manual_seed(0)
    model = create_model("densenet40_12_bc", 10)
    conv = max((m for m in model.modules() if isinstance(m, nn.Conv2d)), key=lambda m: m.weight.numel())
    fan_in = conv.weight[0].numel()
    assert _std_ok(conv.weight, math.sqrt(2.0 / fan_in))
    assert torch.all(model.fc.bias == 0)


def test_vgg_init():
    torch.manual_seed(0)
    model = create_model("vgg16", 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    big = convs[-1]
    assert _std_ok(big.weight, math.sqrt(2.0 / (9 * big.out_channels)))
    assert all(torch.all(c.bias == 0) for c in convs)
    lin = model.classifier[0]
    assert _std_ok(lin.weight, 0.01) and torch.all(lin.bias == 0)


# ------------------------------------------------------------------------------- multi-branch split points


def test_resnet_trunk_and_branch_reuse():
    """The trunk (stem, layer1, layer2) and a branch (layer3, pool, fc) compose to the whole network."""
    model = create_model("resnet32", 10).eval()
    x = _input("resnet32")
    with torch.no_grad():
        h = model.layer2(model.layer1(model.relu(model.bn1(model.conv1(x)))))
        out = model.fc(model.avgpool(model.layer3(h)).flatten(1))
        whole = model(x)
    assert h.shape == (2, 32, 16, 16) and out.shape == (2, 10)
    torch.testing.assert_close(out, whole)


def test_vgg_split():
    model = create_model("vgg16", 10, dropout=0.5)
    convs = lambda mod: sum(isinstance(m, nn.Conv2d) for m in mod.modules())  # noqa: E731
    assert convs(model.trunk_features) == 10 and convs(model.branch_features) == 3
    drops = [m.p for m in model.classifier if isinstance(m, nn.Dropout)]
    assert drops == [0.5, 0.5]
    with torch.no_grad():
        h = model.eval().trunk_features(_input("vgg16"))
        assert h.shape == (2, 512, 2, 2)
        assert model.branch_features(h).shape == (2, 512, 1, 1)


def test_densenet_bc_split():
    m = create_model("densenet40_12_bc", 10).eval()
    with torch.no_grad():
        h = m.trans2(m.dense2(m.trans1(m.dense1(m.conv1(_input("densenet40_12_bc"))))))
    assert h.shape == (2, 60, 8, 8)
    assert m.fc.in_features == 132


# -------------------------------------------------------------------------------------------- complexity


def test_count_macs_layer_rules_and_cleanup():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2),  # 8*5*5 outputs x (4/2)*9 = 3600
        nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1),  # 8*5*5 inputs x 6*9 = 10800
        nn.BatchNorm2d(6),
        nn.Flatten(),
        nn.Linear(6 * 10 * 10, 3),  # 1800
    ).train()
    assert count_macs(model, (1, 4, 5, 5)) == 3600 + 10800 + 1800
    assert count_macs(model, (3, 4, 5, 5)) == 3600 + 10800 + 1800  # per image
    assert model.training and all(m.training for m in model.modules())
    assert _no_hooks(model)


def test_count_macs_removes_hooks_on_error():
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            self.conv(x)
            raise RuntimeError("boom")

    model = Boom()
    with pytest.raises(RuntimeError):
        count_macs(model)
    assert _no_hooks(model)
