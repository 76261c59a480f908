"""ImageNet ResNet-18/34 and the TinyImageNet variants against ``models.md`` §9, §10 and §12."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from okd.models import count_macs, count_parameters, create_model, list_models
from okd.models.registry import MODELS
from okd.nn.fusion import FusionModule, TransFusionDecoder
from okd.nn.self_distillation import SelfDistillationModule, sd_channels_for


def meta_model(name: str, k: int) -> nn.Module:
    """Built on the meta device: shapes, parameter counts and MACs without allocating or initialising."""
    with torch.device("meta"):
        return create_model(name, k)


# models.md §9 (K = 1000, 224x224) and §10 (K = 200, 64x64): params, MACs in millions (2 decimals), last map
COUNTS = [
    ("resnet18", 1000, 224, 11_689_512, 1814.07, 7),
    ("resnet34", 1000, 224, 21_797_672, 3663.76, 7),
    ("resnet18", 200, 64, 11_279_112, 148.15, 2),
    ("resnet34", 200, 64, 21_387_272, 299.14, 2),
    ("resnet18_cifar_stem", 200, 64, 11_271_432, 2221.77, 8),
    ("resnet34_cifar_stem", 200, 64, 21_379_592, 4637.69, 8),
    ("resnet18_cifar_stem", 100, 32, 11_220_132, 555.47, 4),  # §10's CIFAR reference row
    ("resnet34_cifar_stem", 100, 32, 21_328_292, 1159.45, 4),
]


@pytest.mark.parametrize(("name", "k", "size", "params", "macs", "last"), COUNTS)
def test_counts_and_taps_match_models_md(name, k, size, params, macs, last):
    model = meta_model(name, k)
    assert count_parameters(model) == params
    assert round(count_macs(model, (1, 3, size, size)) / 1e6, 2) == macs
    logits, taps = model.forward_taps(torch.empty(2, 3, size, size, device="meta"))
    assert logits.shape == (2, k)
    first = last * 8
    assert [tuple(t.shape[1:]) for t in taps] == [
        (c, first >> i, first >> i) for i, c in enumerate((64, 128, 256, 512))
    ]
    assert model.tap_channels == (64, 128, 256, 512) and model.feature_dim == 512 and model.num_classes == k


def test_registered_with_their_stem():
    for name, stem in [("resnet18", "imagenet"), ("resnet34", "imagenet"), ("resnet18_cifar_stem", "cifar")]:
        assert name in list_models() and MODELS.info(name)["stem"] == stem


def test_forward_matches_forward_taps_and_init():
    torch.manual_seed(0)
    model = create_model("resnet18", 200).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_taps(x)[0])
    # kaiming-normal fan_out: std sqrt(2 / (k*k*C_out)); BN 1/0 everywhere (no zero-init of residual BNs)
    w = model.layer4[1].conv2.weight
    assert abs(w.std().item() / math.sqrt(2.0 / (9 * 512)) - 1) < 0.02
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_state_dict_keys_follow_torchvision():
    keys = set(meta_model("resnet18", 1000).state_dict())
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_var",
        "layer4.1.bn2.weight",
        "fc.weight",
        "fc.bias",
    ):
        assert key in keys
    assert len(keys) == 122 and not any("maxpool" in k for k in keys)
    assert tuple(meta_model("resnet18_cifar_stem", 200).conv1.weight.shape) == (64, 3, 3, 3)


def test_ffsd_modules_for_imagenet_resnets():
    """SD generic rule 512 -> 256 -> 128 -> 64 and the §12 ImageNet row (K = 1000, M = 2)."""
    channels = sd_channels_for(meta_model("resnet18", 1000).tap_channels)
    assert channels == [512, 256, 128, 64]
    with torch.device("meta"):
        sd, fusion, decoder = SelfDistillationModule(channels), FusionModule(512, 1000, 2), TransFusionDecoder(512, 2)
    assert (count_parameters(sd), round(count_macs(sd, (1, 512, 7, 7)) / 1e6, 2)) == (1_549_184, 173.41)
    assert (count_parameters(fusion), round(count_macs(fusion, (1, 1024, 7, 7)) / 1e6, 2)) == (1_049_576, 26.65)
    assert (count_parameters(decoder), round(count_macs(decoder, (1, 512, 7, 7)) / 1e6, 2)) == (531_968, 25.92)
    assert [tuple(o.shape[1:]) for o in sd(torch.empty(1, 512, 7, 7, device="meta"))] == [
        (64, 56, 56),
        (128, 28, 28),
        (256, 14, 14),
    ]
    # at 64x64 the SD outputs line up with the taps for both TinyImageNet stems
    for name in ("resnet18", "resnet18_cifar_stem"):
        model = meta_model(name, 200)
        _, taps = model.forward_taps(torch.empty(1, 3, 64, 64, device="meta"))
        outs = sd(taps[-1])
        assert [o.shape for o in outs] == [t.shape for t in taps[:-1]]
