"""Multi-branch networks against ``models.md`` §11 and the split points of ``methods.md`` §3."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from okd.config import OptimConfig
from okd.errors import ConfigError
from okd.methods import cl_ilr, ffl, okddip, one  # noqa: F401  (register the methods)
from okd.methods.base import METHODS, MethodContext
from okd.models import count_macs, count_parameters, create_model
from okd.models.multibranch import MultiBranchNet

DENSE3_BC = 58_680  # params of DenseNet-40-12-BC's last dense block (models.md §6 arithmetic)


def build(method: str, model: str, num_classes: int = 100, **params) -> nn.Module:
    """A method's whole training graph on the meta device (shapes and counts only, no memory)."""
    hp = METHODS.get(method).Params(**params)
    hp.validate()
    ctx = MethodContext(model=model, num_classes=num_classes, optim=OptimConfig(), params=hp, epochs=1)
    with torch.device("meta"):
        return METHODS.get(method)(ctx)


# models.md §11 (K = 100, 4 branches): OKDDip GL / ONE / CL totals
SECTION_11 = [
    ("resnet32", 1_554_272, 1_553_388, 1_553_248),
    ("resnet110_bottleneck", 3_874_016, 3_858_156, 3_857_632),
    ("wrn20_8", 22_611_936, 22_596_076, 22_595_552),
]


@pytest.mark.parametrize(("model", "gl", "one_", "cl"), SECTION_11)
def test_totals_match_models_md(model, gl, one_, cl):
    assert count_parameters(build("okddip", model)) == gl
    assert count_parameters(build("one", model)) == one_
    assert count_parameters(build("cl_ilr", model)) == cl


def test_vgg16_totals():
    assert count_parameters(build("okddip", "vgg16")) == 38_342_608
    assert count_parameters(build("one", "vgg16")) == 38_279_132


def test_densenet_bc_totals_with_and_without_the_shared_block_bug():
    assert count_parameters(build("okddip", "densenet40_12_bc", share_branch_block=True)) == 233_008
    assert count_parameters(build("one", "densenet40_12_bc", share_branch_block=True)) == 229_036
    # own weights per branch (the default): three more copies of dense block 3
    assert count_parameters(build("okddip", "densenet40_12_bc")) == 233_008 + 3 * DENSE3_BC
    assert count_parameters(build("one", "densenet40_12_bc")) == 229_036 + 3 * DENSE3_BC


def test_ffl_totals():
    method = build("ffl", "resnet32")
    assert count_parameters(method.net) == 832_920
    assert count_parameters(method.fusion) == 16_228


def test_cl_resnet32_macs():
    net = MultiBranchNet("resnet32", 100, 4)
    assert count_macs(net) / 1e6 == pytest.approx(136.78, abs=0.005)


@pytest.mark.parametrize(
    ("model", "trunk", "fmap"),
    [
        ("resnet32", (32, 16, 16), (64, 8, 8)),
        ("resnet110_bottleneck", (128, 16, 16), (256, 8, 8)),
        ("wrn20_8", (128, 16, 16), (256, 8, 8)),
        ("vgg16", (512, 2, 2), (512, 1, 1)),
        ("densenet40_12_bc", (60, 8, 8), (132, 8, 8)),
        ("wrn16_2", (64, 16, 16), (128, 8, 8)),
    ],
)
def test_split_shapes(model, trunk, fmap):
    with torch.device("meta"):
        net = MultiBranchNet(model, 100, 3)
        out = net.forward_branches(torch.empty(2, 3, 32, 32))
    assert tuple(out.trunk.shape) == (2, *trunk) and net.trunk_channels == trunk[0]
    assert [tuple(m.shape) for m in out.maps] == [(2, *fmap)] * 3
    assert [tuple(f.shape) for f in out.features] == [(2, fmap[0])] * 3 and net.feature_dim == fmap[0]
    assert [tuple(z.shape) for z in out.logits] == [(2, 100)] * 3


def test_branches_have_their_own_weights_and_the_bug_switch_shares_the_block():
    net = MultiBranchNet("densenet40_12_bc", 10, 3)
    assert net.branches[0]["dense3"] is not net.branches[1]["dense3"]
    w0, w1 = (net.branches[i]["dense3"][0].body[2].weight for i in (0, 1))
    assert not torch.equal(w0, w1)  # independently initialised
    buggy = MultiBranchNet("densenet40_12_bc", 10, 3, share_branch_block=True)
    assert buggy.branches[0]["dense3"] is buggy.branches[2]["dense3"]
    assert buggy.branches[0]["bn"] is not buggy.branches[1]["bn"]
    assert buggy.branches[0]["fc"] is not buggy.branches[1]["fc"]


def test_vgg_branch_dropout():
    with torch.device("meta"):
        net = MultiBranchNet("vgg16", 10, 2, dropout=0.5)
        plain = MultiBranchNet("vgg16", 10, 2)
    drops = [m.p for b in net.branches for m in b.modules() if isinstance(m, nn.Dropout)]
    assert drops == [0.5] * 4
    assert all(m.p == 0.0 for m in plain.modules() if isinstance(m, nn.Dropout))


def test_single_branch_is_the_plain_backbone_sharing_weights():
    torch.manual_seed(0)
    net = MultiBranchNet("resnet20", 10, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    rng = torch.get_rng_state()
    single = net.single_branch(2)
    assert torch.equal(rng, torch.get_rng_state())  # no RNG consumed (deploy.pt is written every epoch)
    assert single is net.single_branch(2) and type(single) is type(create_model("resnet20", 10))
    own = {id(p) for p in net.parameters()}
    assert all(id(p) in own for p in single.parameters())
    assert count_parameters(single) == count_parameters(create_model("resnet20", 10))
    with torch.no_grad():
        assert torch.equal(single(x), net(x)[2])
        plain = create_model("resnet20", 10).eval()
        plain.load_state_dict(single.state_dict())  # deploy.pt loads into create_model unchanged
        assert torch.allclose(plain(x), net(x)[2])
    assert all(k.split(".")[0] in ("shared", "branches") for k in net.state_dict())  # the cache is not state


def test_single_branch_of_every_family_loads_into_the_backbone():
    for model in ("vgg16", "densenet40_12_bc", "wrn16_2", "resnet110_bottleneck"):
        with torch.device("meta"):
            net = MultiBranchNet(model, 10, 2)
            single = net.single_branch(1)
            ref = create_model(model, 10)
        ours, theirs = single.state_dict(), ref.state_dict()
        assert list(ours) == list(theirs), model
        assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in ours), model


def test_no_split_for_other_families():
    with pytest.raises(ConfigError, match="no multi-branch split"):
        MultiBranchNet("googlenet", 10, 2)
    with pytest.raises(ConfigError):
        MultiBranchNet("resnet20", 10, 0)
