"""The edges of a network of one's own under the branch methods: one_sl (branch_from and taps together),
cuts inside a stage, functional pooling, dict outputs."""

from __future__ import annotations

import sys
import textwrap

import helpers
import pytest
import torch
from folder_fixtures import quick_folder_run, write_class_folder

from okd.errors import ConfigError
from okd.methods.build import build_method, load_config
from okd.models.spec import build_from_spec
from okd.models.staged import StagedNet, TappedStagedNet

MODULE = "okd_edge_nets"
CODE = """
import torch
from torch import nn


def block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Chain(nn.Module):
    def __init__(self, num_classes, pool="module", out="tensor"):
        super().__init__()
        self.stem = block(3, 4, 1)
        self.blocks = nn.Sequential(block(4, 4, 1), block(4, 8, 2), block(8, 8, 1))
        if pool == "module":
            self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(8, num_classes)
        self.mode, self.out = pool, out

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = self.flatten(self.pool(x)) if self.mode == "module" else x.mean((2, 3))
        z = self.fc(x)
        return {"logits": z, "features": x} if self.out == "dict" else (z, x) if self.out == "tuple" else z


def build(num_classes, **kw):
    return Chain(num_classes, **kw)
"""


@pytest.fixture(scope="module")
def edge_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge_code")
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(CODE))
    sys.path.insert(0, str(folder))
    yield f"{MODULE}:build"
    sys.path.remove(str(folder))
    sys.modules.pop(MODULE, None)


def _build(method: str, *extra: str, k: int = 5):
    return build_method(load_config(None, [f"method.name={method}", "data.dataset=cifar10", *extra]), k)


def test_one_sl_takes_branch_from_and_taps_together(edge_module):
    m = _build("one_sl", f"model.name={edge_module}", "model.branch_from=blocks", "model.taps=[stem,blocks]")
    leader = m.sl.leader
    assert isinstance(leader, TappedStagedNet) and leader.tap_names == ["stem", "blocks"]
    assert leader.tap_channels == (4, 8)
    assert leader.tap_shapes == [(4, 32, 32), (8, 16, 16)]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    m.eval()
    with torch.no_grad():
        z, taps = leader.forward_taps(x)
        a = leader.stem(x)
        assert torch.equal(taps[0], a) and torch.equal(taps[1], leader.blocks(a)) and torch.equal(z, leader(x))
    m.train()
    losses = m.training_step(x, torch.tensor([0, 1, 2]), epoch=0)
    total = sum(v for k, v in losses.items() if not k.startswith("stat/"))
    total.backward()
    assert all(p.grad is not None for p in leader.parameters())  # the leader learns through its tap terms
    assert all(p.grad is not None for p in m.net.parameters())  # ONE's branches train as in plain ONE


def test_one_sl_with_one_of_the_two_keys_says_to_add_the_other(edge_module):
    with pytest.raises(ConfigError, match=r"no taps: set model\.taps.*beside model\.branch_from"):
        _build("one_sl", f"model.name={edge_module}", "model.branch_from=blocks")
    with pytest.raises(ConfigError, match=r"branch_from=<first branch stage> \(one_sl: together with model\.taps"):
        _build("one_sl", f"model.name={edge_module}", "model.taps=[stem,blocks]")
    with pytest.raises(ConfigError, match=r"model\.taps=\['fc', 'nope'\]: \['nope'\] are not stages"):
        _build("one_sl", f"model.name={edge_module}", "model.branch_from=blocks", "model.taps=[fc,nope]")
    with pytest.raises(ConfigError, match=r"stages that output feature maps.*fc: \[5\]"):
        _build("one_sl", f"model.name={edge_module}", "model.branch_from=blocks", "model.taps=[blocks,fc]")


def test_one_sl_on_an_own_network_trains_and_resumes_exactly(edge_module, tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    # 9 training images in batches of 8: the last batch of one is left out (BatchNorm1d in ONE's gate), and
    # the resumed run leaves it out the same way
    data = write_class_folder(tmp_path / "data", train_per_class=3, val_per_class=1)
    monkeypatch.setenv("OKD_ALLOW_IMPORT", MODULE)
    runs = helpers.train_and_resume(
        None,
        lambda name, epochs: (
            quick_folder_run(data, tmp_path / "runs", 8, "pad_crop", "data.pad=1", f"name={name}")
            + [
                "method.name=one_sl",
                "method.num_branches=2",
                f"model.name={edge_module}",
                "model.branch_from=blocks.1",  # the trunk holds blocks.0, each branch blocks.1-2
                "model.taps=[stem,blocks]",
                f"train.epochs={epochs}",
            ]
        ),
    )
    helpers.assert_same_runs(*runs)
    deploy = torch.load(runs[0] / "deploy.pt", map_location="cpu", weights_only=True)
    assert deploy["model_spec"]["taps"] == ["stem", "blocks"] and deploy["model_spec"]["branch_from"] == "blocks.1"
    assert "blocks.1.0.weight" in deploy["state_dict"]  # the leader, under the network's own keys


def test_branch_from_cuts_inside_a_sequential_stage_keeping_the_networks_keys(edge_module):
    m = _build("one", f"model.name={edge_module}", "model.branch_from=blocks.1", "method.num_branches=2")
    net = m.net
    assert list(net.shared) == ["stem", "blocks"] and list(net.shared["blocks"]._modules) == ["0"]
    assert list(net.branches[0]["blocks"]._modules) == ["1", "2"] and net.trunk_channels == 4
    assert net.branches[0]["blocks"][0] is not net.branches[1]["blocks"][0]  # each branch its own weights
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    m.eval()
    single = net.single_branch(1)
    reference = build_from_spec(dict(m.net.backbone_name.spec), 5).eval()  # what a deploy.pt rebuilds
    assert list(single.state_dict()) == list(reference.state_dict())  # stem.0.weight, blocks.0..2, fc: the user's
    reference.load_state_dict(single.state_dict())
    with torch.no_grad():
        assert torch.equal(single(x), net(x)[1]) and torch.equal(reference(x), net(x)[1])
    same = _build("one", f"model.name={edge_module}", "model.branch_from=blocks.0", "method.num_branches=2")
    assert same.net.split.trunk == ("stem",) and same.net.split.trunk_part is None  # the stage boundary itself


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("blocks.1.0", "a cut is made at most one level down"),
        ("blocks.7", r"'blocks' has no child '7'; its children: \['0', '1', '2'\]"),
        ("fc.weight", "'fc' is a Linear whose forward is its own code"),
    ],
)
def test_a_cut_that_is_not_defined_is_refused_with_the_reason(edge_module, where, reason):
    with pytest.raises(ConfigError, match=f"model.branch_from='{where}': {reason}.*split that part into two stages"):
        _build("one", f"model.name={edge_module}", f"model.branch_from={where}")


def test_functional_pooling_is_named_as_the_reason(edge_module):
    with pytest.raises(ConfigError) as err:
        _build("one", f"model.name={edge_module}", "model.kwargs.pool=functional", "model.branch_from=blocks")
    text = str(err.value)
    assert "its last stage 'fc' (the classifier) gets the feature map [8, 16, 16]" in text
    assert "pools between stages with a function (e.g. x.mean((2, 3))" in text and "nn.AdaptiveAvgPool2d(1)" in text
    assert "calls its top-level children in order" not in text


@pytest.mark.parametrize(
    ("out", "said"), [("dict", r"a dict \(keys \['logits', 'features'\]\)"), ("tuple", "a tuple of 2")]
)
def test_a_dict_or_tuple_output_is_named(edge_module, out, said):
    with pytest.raises(ConfigError, match=f"returned {said} on a 2-image probe, not a logits tensor"):
        _build("one", f"model.name={edge_module}", f"model.kwargs.out={out}", "model.branch_from=blocks")


def test_branch_from_alone_still_builds_a_plain_staged_net(edge_module):
    m = _build("one", f"model.name={edge_module}", "model.branch_from=blocks", "method.num_branches=2")
    single = m.net.single_branch(0)
    assert isinstance(single, StagedNet) and not hasattr(single, "forward_taps")
