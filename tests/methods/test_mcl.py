"""MCL (okd/methods/mcl.py): each loss term against its equation, gradient flow, the x4 shared trunk, switches,
heads and deployment, and golden values of the official code (winycg/MCL @ 236da2f, run on CPU in float64 with
these weights loaded; only its numbers are kept here)."""

from __future__ import annotations

import dataclasses
import math

import helpers
import pytest
import torch
from method_helpers import K, close, make, no_grad_in, ref_ce, ref_kl, some_grad_in, summed
from torch import Tensor

from okd.config import OptimConfig
from okd.engine.builder import build_optimization
from okd.errors import ConfigError, DataError
from okd.methods.base import METHODS, MethodContext
from okd.methods.build import build_method, load_config
from okd.methods.mcl import mcl_contrast
from okd.models import count_parameters, create_model
from okd.models.deploy_file import build_network, read_deploy
from okd.models.multibranch import stage1_split_for
from okd.report.export import export
from okd.report.published import find_published
from okd.runs.metrics import read_metrics_csv

Y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


# --------------------------------------------------------------------------- the golden setting (float64, K=100)
def fill_weights(module: torch.nn.Module, seed: int) -> None:
    """Deterministic weights: N(0, 2/fan_in) for matrices and kernels, 1 + 0.1 N for vectors named weight (BN
    scales), 0.1 N for the others (biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if p.ndim > 1:
                p.copy_(noise * math.sqrt(2.0 / p[0].numel()))
            else:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)


def golden_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64), Y.clone()


def build_golden_method(num_nets: int, logit_distill: bool):
    """MCL on resnet32 (the smallest backbone of the official code), K = 100, float64, deterministic weights."""
    cfg = load_config(
        None,
        ["method.name=mcl", f"method.num_nets={num_nets}", f"method.logit_distill={str(logit_distill).lower()}"],
    )
    m = build_method(cfg, num_classes=100).double()
    fill_weights(m, 11)
    return m


def balanced_batch(n: int = 8, seed: int = 1, size: int = 16) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) // 2


# ------------------------------------------------------------------------- references written from the equations
def sc_ref(s: Tensor, y: Tensor, instance_positive: bool = False) -> Tensor:
    """-(1/B) sum_r (1/|P_r|) sum_{c in P_r} (S_rc - log sum_{k in O_r} exp S_rk), as explicit masks."""
    b = len(y)
    eye = torch.eye(b, dtype=torch.bool)
    pos = (y[:, None] == y[None, :]) & (torch.ones_like(eye) if instance_positive else ~eye)
    keep = torch.ones_like(eye) if instance_positive else ~eye
    denom = torch.log((s.exp() * keep).sum(1, keepdim=True))
    return -(((s - denom) * pos).sum(1) / pos.sum(1)).mean()


def skl_ref(s_s: Tensor, s_t: Tensor, t: float) -> Tensor:
    return ref_kl(s_s, s_t.detach(), t)


def mcl_ref(embeddings: list[Tensor], y: Tensor, tau: float = 0.1, t: float = 3.0, inst: bool = False) -> dict:
    n = len(embeddings)
    s = [[e_i @ e_j.t() / tau for e_j in embeddings] for e_i in embeddings]
    pairs = [(i, j) for i in range(n) for j in range(n) if i < j]
    return {
        "vcl": sum(sc_ref(s[i][i], y) for i in range(n)),
        "soft_vcl": sum(skl_ref(s[i][i], s[j][j], t) for i in range(n) for j in range(n) if i != j),
        "icl": sum(sc_ref(s[i][j], y, inst) + sc_ref(s[j][i], y, inst) for i, j in pairs),
        "soft_icl": sum(skl_ref(s[i][j], s[j][i], t) + skl_ref(s[j][i], s[i][j], t) for i, j in pairs),
    }


def embed_ref(embed, h: Tensor) -> Tensor:
    lin1, lin2 = embed.proj[0], embed.proj[2]
    z = torch.relu(h @ lin1.weight.t() + lin1.bias) @ lin2.weight.t() + lin2.bias
    return z / z.norm(dim=1, keepdim=True)


def cohort_by_hand(m, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Logits and pooled features of every network, run module by module."""
    if m.shared:
        h = m.net.trunk(x)
        maps = [m.net.branch_map(h, i) for i in range(m.hp.num_nets)]
        feats = [f.mean((2, 3)) for f in maps]
        return [b["fc"](f) for b, f in zip(m.net.branches, feats, strict=True)], feats
    feats = [net.layer3(net.layer2(net.layer1(net.relu(net.bn1(net.conv1(x)))))).mean((2, 3)) for net in m.nets]
    return [net.fc(f) for net, f in zip(m.nets, feats, strict=True)], feats


# ------------------------------------------------------------------------------------------------ loss terms
@pytest.mark.parametrize(
    ("params", "kd_nets"),
    [
        ({}, []),
        ({"num_nets": 4}, []),
        ({"num_nets": 2, "logit_distill": True}, [0, 1]),
        ({"num_nets": 4, "logit_distill": True}, [3]),  # the code's quirk: only the last network
        ({"num_nets": 3, "shared_trunk": False, "logit_distill": True, "kd_last_net_only": False}, [0, 1, 2]),
        ({"icl_instance_positive": True, "vcl_weight": 0.3, "soft_icl_weight": 0.5}, []),
    ],
)
def test_every_term_matches_its_equation(params, kd_nets):
    m = make("mcl", **params).double()
    x, y = balanced_batch()
    x = x.double()
    m.train()
    losses = m.training_step(x, y, 0)
    torch.manual_seed(0)
    m.train()
    logits, feats = cohort_by_hand(m, x)
    hp = m.hp
    emb = [embed_ref(e, h) for e, h in zip(m.embeds, feats, strict=True)]
    ref = mcl_ref(emb, y, hp.tau, hp.temperature, hp.icl_instance_positive)
    expected = {f"net{i}/ce": ref_ce(z, y) for i, z in enumerate(logits)}
    mean = torch.stack(logits).mean(0)
    expected.update({f"net{i}/kd": ref_kl(logits[i], mean.detach(), hp.temperature) for i in kd_nets})
    expected["contrast/vcl"] = hp.vcl_weight * ref["vcl"]
    expected["contrast/soft_vcl"] = hp.soft_vcl_weight * ref["soft_vcl"]
    expected["contrast/icl"] = hp.icl_weight * ref["icl"]
    expected["contrast/soft_icl"] = hp.soft_icl_weight * ref["soft_icl"]
    assert set(losses) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(losses[k], v, rtol=1e-10, atol=1e-12, msg=k)


def test_term_counts_of_x2_and_x4():
    """methods-mcl.md 1.3: N = 4 has 4 VCL, 12 ICL, 12 soft VCL and 12 soft ICL terms. With identical embeddings
    every soft term is 0 and every SC term equals the one of a single matrix."""
    e = torch.nn.functional.normalize(torch.randn(8, 5, dtype=torch.float64), dim=1)
    hp = METHODS.get("mcl").Params(num_nets=4)
    from_method = mcl_contrast([e] * 4, Y, hp)
    one = sc_ref(e @ e.t() / 0.1, Y)
    close(from_method["contrast/vcl"], 0.1 * 4 * one)
    close(from_method["contrast/icl"], 0.1 * 12 * one)
    assert float(from_method["contrast/soft_vcl"]) == pytest.approx(0, abs=1e-12)
    assert float(from_method["contrast/soft_icl"]) == pytest.approx(0, abs=1e-12)


def test_a_batch_without_positives_is_refused():
    m = make("mcl")
    x, _ = balanced_batch(4)
    with pytest.raises(DataError, match="data.sampler=m_per_class"):
        m.training_step(x, torch.tensor([0, 0, 1, 2]), 0)
    m = make("mcl")
    m.training_step(x, torch.tensor([0, 0, 1, 1]), 0)  # the first batch is checked once
    later = m.training_step(x, torch.tensor([0, 0, 1, 2]), 0)  # later batches are not read on the host
    assert math.isnan(float(later["contrast/vcl"].detach())), "what the trainer's non-finite check then refuses"


# ------------------------------------------------------------------------------------------------- gradients
def test_gradient_flow_per_term():
    """CE trains only its own network; VCL and soft VCL of net i train net i and its head (the soft target is
    detached); ICL and soft ICL train both networks and both heads; nothing is detached from the backbone."""
    m = make("mcl", logit_distill=True)
    x, y = balanced_batch()
    for key, trained in (
        ("net0/ce", {"nets.0"}),
        ("net1/kd", {"nets.1"}),  # the ensemble target is detached
        ("contrast/vcl", {"nets.0", "nets.1", "embeds.0", "embeds.1"}),
        ("contrast/icl", {"nets.0", "nets.1", "embeds.0", "embeds.1"}),
    ):
        m.zero_grad(set_to_none=True)
        m.training_step(x, y, 0)[key].backward()
        for part in ("nets.0", "nets.1", "embeds.0", "embeds.1"):
            module = m.get_submodule(part)
            assert some_grad_in(module) == (part in trained), (key, part)


def test_soft_targets_are_detached():
    """Soft VCL sums SKL(S_00 <- S_11) and SKL(S_11 <- S_00), each target detached: net 0's embedding gets the
    gradient of the first term only (the second would reach it only through its detached target)."""
    hp = METHODS.get("mcl").Params(vcl_weight=0.0, icl_weight=0.0, soft_icl_weight=0.0)
    g = torch.Generator().manual_seed(3)
    e0 = torch.nn.functional.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=1)
    e1 = torch.nn.functional.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=1)
    a = e0.clone().requires_grad_()
    mcl_contrast([a, e1], Y, hp)["contrast/soft_vcl"].backward()
    a0 = e0.clone().requires_grad_()
    (want,) = torch.autograd.grad(skl_ref(a0 @ a0.t() / 0.1, e1 @ e1.t() / 0.1, 3.0), a0)
    torch.testing.assert_close(a.grad, want, rtol=1e-12, atol=1e-14)
    # soft ICL: SKL(S_01 <- S_10) + SKL(S_10 <- S_01); with e1 fixed, e0 gets both students' gradients only
    hp = METHODS.get("mcl").Params(vcl_weight=0.0, icl_weight=0.0, soft_vcl_weight=0.0)
    a = e0.clone().requires_grad_()
    mcl_contrast([a, e1], Y, hp)["contrast/soft_icl"].backward()
    a0 = e0.clone().requires_grad_()
    s01, s10 = a0 @ e1.t() / 0.1, e1 @ a0.t() / 0.1
    (want,) = torch.autograd.grad(skl_ref(s01, s10, 3.0) + skl_ref(s10, s01, 3.0), a0)
    torch.testing.assert_close(a.grad, want, rtol=1e-12, atol=1e-14)


def test_one_backward_equals_the_code_graph_and_trains_every_parameter():
    m = make("mcl", num_nets=4)
    x, y = balanced_batch()
    summed(m.training_step(x, y, 0)).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing[:5]
    assert some_grad_in(m.net.shared) and some_grad_in(m.embeds[3])
    m.zero_grad(set_to_none=True)
    m.training_step(x, y, 0)["net3/ce"].backward()
    assert some_grad_in(m.net.shared) and some_grad_in(m.net.branches[3])
    assert no_grad_in(m.net.branches[0]) and no_grad_in(m.embeds), "CE of branch 3 trains the trunk and branch 3"


# -------------------------------------------------------------------------------------- structure and switches
def test_x4_is_one_shared_trunk_cut_after_stage1_and_false_gives_independent_networks():
    shared = make("mcl", num_nets=4)
    assert shared.shared and list(shared.net.shared) == ["conv1", "bn1", "relu", "layer1"]
    assert list(shared.net.branches[0]) == ["layer2", "layer3", "fc"]
    own = make("mcl", num_nets=4, shared_trunk=False)
    assert not own.shared and len(own.nets) == 4
    assert not make("mcl", num_nets=2).shared, "N = 2 is always two independent networks (the code)"
    assert count_parameters(own) > count_parameters(shared)


@pytest.mark.parametrize(
    ("model", "x4_params"),
    [("resnet32", 1_819_552), ("wrn16_2_crd", 2_712_864), ("shufflenetv2_x0_5", 1_754_272)],
)
def test_x4_parameter_counts_and_heads_match_the_spec(model, x4_params):
    """methods-mcl.md 3.5: the x4 shared-trunk networks; plus 4 Embed heads of d*128 + 128 + 128*128 + 128."""
    m = make("mcl", model=model, num_nets=4)
    m_100 = METHODS.get("mcl")(
        MethodContext(model=model, num_classes=100, optim=OptimConfig(), params=m.hp, epochs=300)
    )
    assert count_parameters(m_100.net) == x4_params
    d = m_100.net.feature_dim
    assert count_parameters(m_100.embeds) == 4 * (d * 128 + 128 + 128 * 128 + 128)
    assert all(b["fc"].bias.abs().sum() > 0 for b in m_100.net.branches), "x4 classifiers: PyTorch's default init"


def test_hcgnet_x4_runs():
    m = make("mcl", model="hcgnet_a1", num_nets=4)
    x, y = balanced_batch(4)
    losses = m.training_step(x, y, 0)
    assert all(math.isfinite(float(v.detach())) for v in losses.values())


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["method.num_nets=1"], "method.num_nets must be >= 2"),
        (["method.tau=0"], "method.tau must be positive"),
        (["method.temperature=-1"], "method.temperature must be positive"),
        (["method.icl_weight=-0.1"], "method.icl_weight must be >= 0"),
        (["method.deploy_net=2"], "method.deploy_net=2 is not a net"),
        (["method.embed_dim=0"], "method.embed_dim must be >= 1"),
    ],
)
def test_bad_params_fail_at_config_time(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, ["method.name=mcl", *overrides])


def test_shared_trunk_refuses_mixed_members_and_families_without_a_split():
    with pytest.raises(ConfigError, match="shared_trunk=false"):  # what MCL x4 on a VGG-16 raises
        stage1_split_for(create_model("vgg16", K), "vgg16")
    ctx = MethodContext(
        model="resnet20",
        num_classes=K,
        optim=OptimConfig(),
        params=METHODS.get("mcl").Params(num_nets=4),
        epochs=1,
        members=["resnet20", "resnet20", "resnet32", "resnet20"],
    )
    with pytest.raises(ConfigError, match="cannot mix networks"):
        METHODS.get("mcl")(ctx)
    with pytest.raises(ConfigError, match="mcl cannot train a cohort of different networks"):
        load_config(None, ["method.name=mcl", "model.members=[resnet20,wrn16_2]"])
    assert load_config(None, ["method.name=mcl", "model.members=[resnet20,resnet20]"]).method_params.num_nets == 2


# ---------------------------------------------------------------------------------------- heads and deployment
@pytest.mark.parametrize("params", [{"deploy_net": 1}, {"num_nets": 4, "deploy_net": 3}])
def test_heads_metrics_and_deployable(params):
    m = make("mcl", **params).eval()
    x, _ = balanced_batch(4)
    heads = m.eval_outputs(x)
    n = m.hp.num_nets
    assert list(heads) == [f"net{i}" for i in range(n)] + ["mean_logits", "ensemble"]
    net = m.deployable()
    fresh = create_model("resnet20", K)
    fresh.load_state_dict(net.state_dict())
    close(fresh.eval()(x), heads[m.deploy_head])
    metrics = {f"net{i}/top1": 50.0 + i for i in range(n)} | {f"net{i}/top5": 80.0 + i for i in range(n)}
    derived = m.derived_metrics(metrics)
    assert derived["net_avg/top1"] == pytest.approx(50 + (n - 1) / 2)
    assert derived[f"net_best_of_{n}/top1"] == 50.0 + n - 1 and derived[f"net_best_of_{n}/top5"] == 80.0 + n - 1
    assert m.oracle_groups() == {"oracle_any_net": [f"net{i}" for i in range(n)]}


def test_one_optimizer_group_over_networks_and_heads():
    m = make("mcl")
    (group,) = m.param_groups()
    assert group.name == "cohort" and len(group.params) == len(list(m.parameters()))


# --------------------------------------------------------------------------------------------------- golden values
# The official code (winycg/MCL @ 236da2f: models.resnet32, losses/cifar_sup_mcl_loss.Sup_MCL_Loss, utils.DistillKL,
# the loss assembly of main_cifar.py's train() and its SGD) run on CPU in float64 with the weights of
# ``build_golden_method`` loaded and ``golden_batch``: every loss term, and per picked tensor its gradient norm, its
# first three gradient entries and its first three entries after one SGD step (lr 0.1 = cosine at epoch 0, momentum
# 0.9, Nesterov, wd 5e-4). okd agreed with it to 7e-14 relative on every term and gradient and 2e-15 on every
# parameter after the step. CE of a random resnet32 with K = 100 is near ln(100) = 4.6 (larger with these unscaled
# weights); the contrastive terms are small because the soft targets of two random networks nearly agree.
GOLDEN = {
    "x2": {
        "terms": {
            "net0/ce": 6.197597946409627,
            "net1/ce": 7.193640226969939,
            "contrast/vcl": 0.39009306541159405,
            "contrast/soft_vcl": 0.0021587585935318523,
            "contrast/icl": 0.3899101773077094,
            "contrast/soft_icl": 0.004046852935198672,
        },
        "grads": {
            "net0.conv1.weight": (
                4.067110016430366,
                [0.11663547727954987, 0.2196922810571772, 0.2495390618398545],
                [0.05359745907100065, -0.551626372079879, 0.35010071203828413],
            ),
            "embed0.proj.0.weight": (
                0.02514406935574902,
                [0.0006949242649113085, 0.0008154934083090464, 0.0010576177401387583],
                [0.09937435645575875, -0.04811261357244195, 0.02794362801267163],
            ),
            "last.fc.weight": (
                7.128536215533822,
                [-0.4167340719379213, -0.4399601267690735, -0.392595637917705],
                [0.033505044480859725, 0.10952991692912821, -0.09887127912497522],
            ),
            "embed_last.proj.2.bias": (
                0.0013312005058050843,
                [8.205288645773322e-05, 0.0001391398026960854, -1.3105048634015073e-05],
                [-0.06284119209246293, -0.16338344153516646, 0.04175240212259607],
            ),
        },
    },
    "x2_kd": {
        "terms": {
            "net0/ce": 6.197597946409627,
            "net1/ce": 7.193640226969939,
            "net0/kd": 0.8481443262111094,
            "net1/kd": 0.8853691348226185,
            "contrast/vcl": 0.39009306541159405,
            "contrast/soft_vcl": 0.0021587585935318523,
            "contrast/icl": 0.3899101773077094,
            "contrast/soft_icl": 0.004046852935198672,
        },
        "grads": {
            "net0.conv1.weight": (
                4.129133226324541,
                [0.1133450003500169, 0.21659388890036216, 0.2551739923966283],
                [0.05422264968761192, -0.5510376775700842, 0.3490300752324971],
            ),
            "embed0.proj.0.weight": (
                0.02514406935574902,
                [0.0006949242649113085, 0.0008154934083090464, 0.0010576177401387583],
                [0.09937435645575875, -0.04811261357244195, 0.02794362801267163],
            ),
            "last.fc.weight": (
                7.973544482145652,
                [-0.4249270656481205, -0.448591871889883, -0.4007861361414532],
                [0.03506171328579758, 0.11116994850208203, -0.09731508446246306],
            ),
            "embed_last.proj.2.bias": (
                0.0013312005058050843,
                [8.205288645773322e-05, 0.0001391398026960854, -1.3105048634015073e-05],
                [-0.06284119209246293, -0.16338344153516646, 0.04175240212259607],
            ),
        },
    },
    "x4_kd": {
        "terms": {
            "net0/ce": 6.197597946409627,
            "net1/ce": 6.4045306740662715,
            "net2/ce": 5.54131463608161,
            "net3/ce": 4.672250086443814,
            "net3/kd": 1.154221745228658,
            "contrast/vcl": 0.7804189177241961,
            "contrast/soft_vcl": 0.027146272339369056,
            "contrast/icl": 2.3432733758652957,
            "contrast/soft_icl": 0.16831275960820302,
        },
        "grads": {
            "net0.conv1.weight": (
                8.03136050352601,
                [0.12704402763613395, 0.505439899647047, 0.2147169729184409],
                [0.051619834503249674, -0.6059184196119543, 0.35671690893335267],
            ),
            "embed0.proj.0.weight": (
                0.10148839550859229,
                [0.0, 0.0, 0.0],
                [-0.1459912334566047, -0.19176545306968928, -0.33353563052641194],
            ),
            "last.fc.weight": (
                6.258254267735049,
                [-0.38572886292336184, -0.2617752185640968, -0.329507289482308],
                [-0.16806855195765974, -0.07929521880943058, 0.16818484882601972],
            ),
            "embed_last.proj.2.bias": (
                0.008867167376249369,
                [-0.0005609244330842173, -0.0009281038131702848, -0.0013852313235064155],
                [-0.020027499135031004, 0.09731748025182257, 0.06538566814315684],
            ),
        },
    },
}


def picked(m) -> dict[str, Tensor]:
    last = m.net.branches[-1]["fc"] if m.shared else m.nets[-1].fc
    first = m.net.shared["conv1"] if m.shared else m.nets[0].conv1
    return {
        "net0.conv1.weight": first.weight,
        "embed0.proj.0.weight": m.embeds[0].proj[0].weight,
        "last.fc.weight": last.weight,
        "embed_last.proj.2.bias": m.embeds[-1].proj[2].bias,
    }


@pytest.mark.parametrize(
    ("case", "num_nets", "logit_distill"), [("x2", 2, False), ("x2_kd", 2, True), ("x4_kd", 4, True)]
)
def test_golden_values_of_the_official_code(case, num_nets, logit_distill):
    m = build_golden_method(num_nets, logit_distill)
    x, y = golden_batch()
    m.train()
    losses = m.training_step(x, y, 0)
    want = GOLDEN[case]
    assert set(losses) == set(want["terms"])
    for key, value in want["terms"].items():
        assert float(losses[key].detach()) == pytest.approx(value, rel=1e-10), key
    summed(losses).backward()
    cfg = load_config(None, ["method.name=mcl", f"method.num_nets={num_nets}", "optim.schedule=cosine"])
    plan = build_optimization(m, cfg)
    plan.optimizers[0].step()
    for name, p in picked(m).items():
        norm, first, after = want["grads"][name]
        assert float(p.grad.norm()) == pytest.approx(norm, rel=1e-10), name
        assert p.grad.flatten()[:3].tolist() == pytest.approx(first, rel=1e-10, abs=1e-15), name
        assert p.detach().flatten()[:3].tolist() == pytest.approx(after, rel=1e-10, abs=1e-15), name


# ------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_x4_trains_end_to_end_on_class_balanced_batches_and_resumes_exactly(cifar10_root, tmp_path):
    settings = {
        "method.name": "mcl",
        "method.num_nets": 4,
        "method.logit_distill": "true",
        "model.name": "resnet20",
        "data.dataset": "cifar10",
        "data.sampler": "m_per_class",
        "data.batch_size": 8,
        "data.limit_train": 96,
        "data.limit_test": 40,
        "optim.schedule": "cosine",
        "train.max_steps_per_epoch": 2,
    }
    full, resumed = helpers.train_and_resume(
        None, lambda name, epochs: helpers.quick_overrides(cifar10_root, tmp_path, name, epochs, settings)
    )
    helpers.assert_same_runs(full, resumed, metrics=False)
    rows = read_metrics_csv(full / "metrics.csv")
    # the 1-epoch run logged lr(1) of its own cosine (E = 1): 0; every other number is the same
    split = helpers.comparable(read_metrics_csv(resumed / "metrics.csv"))
    assert split[0].pop("lr/cohort") == pytest.approx(0.0, abs=1e-17)
    assert [
        {k: v for k, v in r.items() if k != "lr/cohort" or i} for i, r in enumerate(helpers.comparable(rows))
    ] == split
    last = rows[-1]
    nets = [last[f"test/net{i}/top1"] for i in range(4)]
    assert last["test/net_best_of_4/top1"] == max(nets)
    assert last["test/net_avg/top1"] == pytest.approx(sum(nets) / 4)
    assert {"train/net3/kd", "train/contrast/icl"} <= set(last) and "train/net0/kd" not in last
    # each row logs the lr of the next epoch: lr(1) = 0.1 * 0.5 * (1 + cos(pi / 2)) = 0.05, lr(2) = 0
    assert [r["lr/cohort"] for r in rows] == pytest.approx([0.05, 0.0], abs=1e-17)
    assert type(build_network(read_deploy(full / "deploy.pt"), full / "deploy.pt")).__name__ == "CifarResNet"
    res = export(full, "state_dict", tmp_path / "branch3.pt", overrides=["method.deploy_net=3"])
    assert res.training_diff is not None and res.training_diff <= 1e-5  # the trunk + branch 3 scores as head net3


def test_published_rows_are_the_code_metric_of_each_variant():
    """The MCL README rows sit on ``net_best_of_<N>`` (its best column is the code's metric), one per variant."""
    defaults = dataclasses.asdict(METHODS.get("mcl").Params())

    def found(model: str, **params) -> list[tuple[str, str, str]]:
        rows = find_published("mcl", model, "cifar100", {**defaults, **params}, defaults, recipe="mcl")
        return [(r.value, r.std, r.head) for r in rows]

    assert found("resnet32") == [("72.96", "0.28", "net_best_of_2")]
    assert found("resnet32", num_nets=4) == [("74.04", "0.07", "net_best_of_4")]
    assert found("wrn16_2_crd", num_nets=4, logit_distill=True) == [("76.34", "0.22", "net_best_of_4")]
    assert found("resnet32", num_nets=4, shared_trunk=False) == [], "independent x4 networks are not the README's"


X2 = ["resnet32", "resnet56", "resnet110_bottleneck", "wrn16_2_crd", "wrn40_2_crd", "hcgnet_a1"]
X2 += ["shufflenetv2_x0_5", "shufflenetv2_x1_0"]
X4_KD = ["wrn16_2_crd", "wrn40_2_crd", "wrn28_4_crd", "shufflenetv2_x1_0", "hcgnet_a2"]


def test_configs_are_every_published_cell_with_the_code_hyperparameters():
    """methods-mcl.md 1.7 and 4: one config per README cell; 300 epochs of per-epoch cosine from 0.1, SGD Nesterov
    0.9, wd 5e-4, batch 128 as 64 classes x 2, zero padding, MCL's normalisation, test batch 128."""
    cells = [(f"mcl_{m}", m, 2, False) for m in X2] + [(f"mcl_x4_{m}", m, 4, False) for m in X2]
    cells += [(f"mcl_x4_kd_{m}", m, 4, True) for m in X4_KD]
    for name, model, n, kd in cells:
        cfg = load_config(f"cifar100/{name}")
        run, hp = cfg.run, cfg.method_params
        assert (run.recipe, run.model.name, hp.num_nets, hp.logit_distill, hp.shared_trunk) == (
            "mcl",
            model,
            n,
            kd,
            True,
        )
        o, d = run.optim, run.data
        assert (run.train.epochs, o.lr, o.schedule, o.nesterov, o.momentum, o.weight_decay) == (
            300, 0.1, "cosine", True, 0.9, 5e-4,
        )  # fmt: skip
        assert (d.batch_size, d.sampler, d.m_per_class, d.pad, d.padding_mode, d.test_batch_size, run.seed) == (
            128, "m_per_class", 2, 4, "zeros", 128, 0,
        )  # fmt: skip
        assert d.mean == [0.5071, 0.4867, 0.4408] and d.std == [0.2675, 0.2565, 0.2761]
        assert (hp.tau, hp.temperature, hp.embed_dim) == (0.1, 3.0, 128)
        assert (hp.vcl_weight, hp.soft_vcl_weight, hp.icl_weight, hp.soft_icl_weight) == (0.1, 1.0, 0.1, 1.0)
