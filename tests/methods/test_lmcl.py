"""L-MCL (okd/methods/lmcl.py, lmcl_net.py, lmcl_meta.py; okd/models/aux_branches.py): every term against its
equation, the gradient flow of the main step and of the inner objective, the hypergradient against a direct
unrolled differentiation, the meta round's side effects and schedule, golden values of the reference code, and
an end-to-end run with exact resume."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import helpers
import pytest
import torch
import torch.nn.functional as F
from method_helpers import no_grad_in, ref_ce, ref_kl, some_grad_in
from torch import nn

from okd.config import OptimConfig
from okd.errors import ConfigError, DataError
from okd.methods.base import MethodContext
from okd.methods.build import load_config
from okd.methods.lmcl import LMCL, LMCLParams
from okd.methods.lmcl_meta import MetaSettings, hypergradient
from okd.methods.lmcl_net import Aggregator, LossWeightNetwork, layer_contrast, ordered_pairs
from okd.models import create_model
from okd.models.aux_branches import AuxBranchNet
from okd.report.published import find_published

LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # the golden batch
SMALL = torch.tensor([0, 0, 1, 1])  # every other test: two classes, two images each


def make_lmcl(model: str = "resnet20", classes: int = 10, seed: int = 0, lr: float = 0.1, **params) -> LMCL:
    hp = LMCLParams(**params)
    hp.validate()
    torch.manual_seed(seed)
    ctx = MethodContext(model=model, num_classes=classes, optim=OptimConfig(lr=lr), params=hp, epochs=300)
    return LMCL(ctx).train()


def images(n: int = 4, size: int = 8, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=dtype)


class Runner:
    """What ``manual_step`` uses of a StepRunner in one process, on plain SGD optimizers built from the method's
    groups."""

    def __init__(self, method: LMCL) -> None:
        self.model = method
        self.optimizers = [
            torch.optim.SGD(g.params, lr=g.lr, momentum=g.momentum, weight_decay=g.weight_decay, nesterov=g.nesterov)
            for g in method.param_groups()
        ]

    def zero_grad(self, i: int) -> None:
        self.optimizers[i].zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step_optimizer(self, i: int) -> None:
        self.optimizers[i].step()

    def average_across_processes(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return tensors


# ------------------------------------------------------------------------------------------------ networks
#: (backbone, aux) parameters per network with K = 100, from the reference model files (spec methods-mcl §3.4)
COUNTS = {
    "resnet32": (472_756, 809_096),
    "resnet56": (861_620, 1_475_208),
    "resnet110_bottleneck": (1_170_868, 2_011_080),
    "wrn16_2_crd": (703_284, 1_208_200),
    "wrn40_2_crd": (2_255_156, 3_867_528),
    "wrn28_4_crd": (5_872_180, 10_089_032),
    "shufflenetv2_x0_5": (444_292, 827_768),
    "shufflenetv2_x1_0": (1_356_104, 2_406_252),
    "hcgnet_a1": (1_102_651, 1_478_429),
    "hcgnet_a2": (3_133_679, 4_114_546),
}


@pytest.mark.parametrize("model", sorted(COUNTS))
def test_aux_branch_parameter_counts(model):
    with torch.device("meta"):
        net = AuxBranchNet(model, 100)
    backbone = sum(p.numel() for p in net.backbone.parameters())
    assert (backbone, sum(p.numel() for p in net.parameters()) - backbone) == COUNTS[model]


@pytest.mark.parametrize(
    ("members", "counts"),
    [
        (["resnet32", "resnet32"], [2_563_704, 148_992, 49_920, 25_094]),
        (["shufflenetv2_x1_0", "resnet110_bottleneck"], [6_944_304, 591_360, 492_288, 3_347_462]),
    ],
)
def test_whole_graph_counts(members, counts):
    """The reference's whole training graph: networks, Embed heads, loss-weight network, aggregators."""
    ctx = MethodContext(model=members[0], num_classes=100, optim=OptimConfig(), params=LMCLParams(), epochs=1)
    ctx.members = members
    with torch.device("meta"):
        m = LMCL(ctx)
    assert [
        sum(p.numel() for p in mod.parameters()) for mod in (m.nets, m.embeds, m.weight_net, m.aggregators)
    ] == counts


def test_aux_heads_run_their_own_later_stages_and_the_backbone_head_is_the_backbone():
    torch.manual_seed(0)
    net = AuxBranchNet("resnet20", 10).eval()
    x = images(dtype=torch.float32)
    feats, logits = net(x)
    assert [f.shape for f in feats] == [(4, 64)] * 3
    b = net.backbone
    with torch.no_grad():
        t1 = b.layer1(b.relu(b.bn1(b.conv1(x))))
        t2 = b.layer2(t1)
        aux1 = net.aux1.fc(F.adaptive_avg_pool2d(net.aux1.layer3(net.aux1.layer2(t1)), 1).flatten(1))
        aux2 = net.aux2.fc(F.adaptive_avg_pool2d(net.aux2.layer3(t2), 1).flatten(1))
        torch.testing.assert_close(logits[2], b(x))
    torch.testing.assert_close(logits[0], aux1)
    torch.testing.assert_close(logits[1], aux2)
    ids = [{id(p) for p in mod.parameters()} for mod in (net.backbone, net.aux1, net.aux2)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert not net.aux1.fc.bias.any() and not net.aux2.fc.bias.any()  # the reference's aux init: Linear bias 0
    # the taps are not detached: an aux head trains the backbone's stage 1, never its stage 3
    logits[0].sum().backward()
    assert some_grad_in(net.backbone.layer1) and no_grad_in(net.backbone.layer2) and no_grad_in(net.backbone.layer3)


def test_unsupported_backbone_is_refused_with_the_families():
    with pytest.raises(ConfigError, match="wrn16_2_crd"):
        AuxBranchNet("wrn16_2", 10)  # FFSD's WRN, not the CRD layout


# ------------------------------------------------------------------------------------------------ terms
def test_loss_weights_are_sigmoid_cosines_in_the_reference_loop_order():
    torch.manual_seed(0)
    phi = LossWeightNetwork([[5, 5, 5], [6, 6, 6]], proj_dim=4).double()
    feats = [[torch.randn(3, d, dtype=torch.float64) for _ in range(3)] for d in (5, 6)]
    weights = phi(feats)
    order = [(i, k, j, z) for i in range(2) for j in range(2) if i != j for k in range(3) for z in range(3)]
    assert ordered_pairs(2, 3) == order and len(weights) == 18
    for w, (i, k, j, z) in zip(weights, order, strict=True):
        a, b = phi.proj[i][k](feats[i][k]), phi.proj[j][z](feats[j][z])
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
        torch.testing.assert_close(w, 1 / (1 + torch.exp(-cos)))


def test_aggregator_mixes_the_heads_by_a_softmax_of_the_features():
    torch.manual_seed(0)
    agg = Aggregator(4, 3).double()
    feats = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    logits = [torch.randn(5, 7, dtype=torch.float64) for _ in range(3)]
    lin1, lin2 = agg.gate[0], agg.gate[2]
    g = lin2(torch.relu(lin1(torch.cat(feats, 1))))
    pi = torch.exp(g) / torch.exp(g).sum(1, keepdim=True)
    expected = sum(pi[:, s, None] * logits[s] for s in range(3))
    torch.testing.assert_close(agg(feats, logits), expected)


def ref_sc(S, y, w):
    """SC(S; w) written out: -(1/B) sum_r w_r mean_{c in P_r} (S_rc - log sum_{k != r} exp S_rk)."""
    B, total = S.shape[0], 0.0
    for r in range(B):
        denom = torch.log(sum(torch.exp(S[r, k]) for k in range(B) if k != r))
        pos = [c for c in range(B) if c != r and y[c] == y[r]]
        total = total + w[r] * sum(S[r, c] - denom for c in pos) / len(pos)
    return -total / B


def ref_skl(Ss, St, w, T):
    """SKL(S_s <- S_t; w) = T^2 (1/B) sum_r w_r KL(softmax(S_t/T)_r || softmax(S_s/T)_r)."""
    q, logp = torch.softmax(St / T, 1), torch.log_softmax(Ss / T, 1)
    return T * T * (w[:, None] * q * (q.log() - logp)).sum() / Ss.shape[0]


def test_layer_contrast_is_the_ordered_pair_sum_with_double_counting():
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([0, 0, 1, 1])
    emb = [
        [F.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=1) for _ in range(3)] for _ in range(2)
    ]
    weights = [0.3 + 0.4 * torch.rand(4, generator=g, dtype=torch.float64) for _ in range(18)]
    tau, T = 0.1, 3.0
    got = layer_contrast(emb, y, weights, tau, T)
    want = [0.0] * 4
    p = 0
    for i in range(2):
        for j in range(2):
            if i == j:
                continue
            for k in range(3):
                for z in range(3):
                    a, b, w = emb[i][k], emb[j][z], weights[p]
                    saa, sbb, sab, sba = a @ a.T / tau, b @ b.T / tau, a @ b.T / tau, b @ a.T / tau
                    want[0] += ref_sc(saa, y, w) + ref_sc(sbb, y, w)
                    want[1] += ref_skl(saa, sbb, w, T) + ref_skl(sbb, saa, w, T)
                    want[2] += ref_sc(sab, y, w) + ref_sc(sba, y, w)
                    want[3] += ref_skl(sab, sba, w, T) + ref_skl(sba, sab, w, T)
                    p += 1
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_main_step_terms_against_their_equations():
    m = make_lmcl().double()
    x = images()
    losses = m.training_step(x, SMALL, 0)
    with torch.no_grad():
        feats, logits = m.forward_all(x)
        weights = m.weight_net(feats)
        zhat = [m.aggregators[i](feats[i], logits[i]) for i in range(2)]
        vcl, svcl, icl, sicl = layer_contrast(m.embed(feats), SMALL, weights, 0.1, 3.0)
    for i in range(2):
        for s, stage in enumerate(("aux1", "aux2", "backbone")):
            torch.testing.assert_close(losses[f"net{i}/ce_{stage}"], ref_ce(logits[i][s], SMALL))
        torch.testing.assert_close(losses[f"net{i}/ce_aggregated"], ref_ce(zhat[i], SMALL))
        # KD into the backbone head from every aggregated logit, its own included (4 terms for 2 networks)
        torch.testing.assert_close(losses[f"net{i}/kd"], sum(ref_kl(logits[i][2], zhat[j], 3.0) for j in range(2)))
    torch.testing.assert_close(losses["contrast/vcl"], 0.1 * vcl)
    torch.testing.assert_close(losses["contrast/soft_vcl"], svcl)
    torch.testing.assert_close(losses["contrast/icl"], 0.1 * icl)
    torch.testing.assert_close(losses["contrast/soft_icl"], sicl)
    assert len([k for k in losses if "/ce_" in k]) == 8
    assert len(weights) == 18  # the logged statistic: the mean of the 18 pair weights
    torch.testing.assert_close(losses["stat/pair_weight_mean"], torch.stack(weights).mean().float())


def test_main_step_gradient_flow():
    """phi's weights are constants; the KD target is detached (the aggregator learns from CE(zhat) only); the aux
    heads get no KD; the contrastive terms reach the Embed heads and the networks."""
    m = make_lmcl().double()
    losses = m.training_step(images(), SMALL, 0)
    sum(v for k, v in losses.items() if not k.startswith("stat/")).backward()
    assert all(p.grad is None for p in m.weight_net.parameters())
    m.zero_grad(set_to_none=True)
    losses = m.training_step(images(), SMALL, 0)
    (losses["net0/kd"] + losses["net1/kd"]).backward()
    assert no_grad_in(m.aggregators) and no_grad_in(m.embeds)
    assert no_grad_in(m.nets[0].aux1.fc) and no_grad_in(m.nets[0].aux2.fc) and some_grad_in(m.nets[0].backbone.fc)
    m.zero_grad(set_to_none=True)
    losses = m.training_step(images(), SMALL, 0)
    losses["contrast/icl"].backward()
    assert some_grad_in(m.embeds) and some_grad_in(m.nets[1].aux1.layer2) and no_grad_in(m.aggregators)


def test_inner_objective_is_differentiable_in_phi_and_through_the_weights_in_theta():
    m = make_lmcl().double()
    x = images()
    theta = [p.detach().clone().requires_grad_() for _, _, p in m.theta()]
    loss = m.inner_objective(theta, x, SMALL)
    phi = list(m.weight_net.parameters())
    grads = torch.autograd.grad(loss, [*phi, *theta], retain_graph=True, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[: len(phi)])
    # the same objective with the weights frozen gives theta another gradient: w depends on theta through f
    feats, _ = m._functional_forward(theta, x)
    frozen = [w.detach() for w in m.weight_net(feats)]
    emb = m._functional_embed(theta, feats)
    loss2 = sum(m.contrast_losses(emb, SMALL, frozen).values())
    torch.testing.assert_close(loss, loss2)
    g_full = torch.autograd.grad(loss, theta, retain_graph=True, allow_unused=True)
    g_frozen = torch.autograd.grad(loss2, theta, allow_unused=True)
    diff = sum((a - b).abs().sum() for a, b in zip(g_full, g_frozen, strict=True) if a is not None)
    assert diff > 1e-8
    # the classifiers are not in the inner objective (g = 0 there), the Embed heads not in the outer one
    names = [f"{type(mod).__name__}.{n}" for mod, n, _ in m.theta()]
    assert all(g is None for n, g in zip(names, g_full, strict=True) if n.endswith("fc.weight"))


# ------------------------------------------------------------------------------------------------ meta round
def tiny_problem():
    """A two-layer theta (one part unused by the inner objective) and a phi that weighs the inner loss."""
    g = torch.Generator().manual_seed(5)
    theta0 = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)]
    phi = [torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)]
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)

    def inner(th):
        h = torch.tanh(x @ th[0])
        return (torch.sigmoid(h @ phi[0]) * (h**2).sum(1)).mean()

    def outer(th):
        return ((torch.tanh(x @ th[0]) @ th[1] - 1.0) ** 2).mean()

    return theta0, phi, inner, outer


def direct_hypergradient(theta0, phi, inner, outer, cfg: MetaSettings):
    theta = [t.clone().requires_grad_() for t in theta0]
    velocity = None
    for objective in [inner] * cfg.inner_steps + [outer]:
        grads = torch.autograd.grad(objective(theta), theta, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(theta, grads, strict=True)]
        step = [g + cfg.weight_decay * t for g, t in zip(grads, theta, strict=True)]
        velocity = step if velocity is None else [cfg.momentum * v + s for v, s in zip(velocity, step, strict=True)]
        theta = [t - cfg.lr * v for t, v in zip(theta, velocity, strict=True)]
    return torch.autograd.grad(outer(theta), phi)


@pytest.mark.parametrize("inner_steps", [1, 2, 3])
def test_exact_adjoint_equals_the_direct_unrolled_hypergradient(inner_steps):
    theta0, phi, inner, outer = tiny_problem()
    cfg = MetaSettings(lr=0.3, momentum=0.9, weight_decay=0.05, inner_steps=inner_steps, adjoint_wd_bug=False)
    got, _ = hypergradient(theta0, phi, inner, outer, cfg)
    want = direct_hypergradient(theta0, phi, inner, outer, cfg)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-15)
    buggy, _ = hypergradient(theta0, phi, inner, outer, MetaSettings(0.3, 0.9, 0.05, inner_steps, True))
    if inner_steps > 1:  # the dropped factor acts from the second step back
        assert (buggy[0] - want[0]).abs().max() > 1e-4 * want[0].abs().max()


def test_method_hypergradient_equals_functional_call_unroll():
    """On the networks themselves: okd's exact reverse sweep against autograd through the three virtual steps."""
    m = make_lmcl(meta_adjoint_wd_bug=False).double()
    x = images()
    theta0 = [p.detach().clone() for _, _, p in m.theta()]
    phi = list(m.weight_net.parameters())
    cfg = m.meta_settings(0.1)
    inner, outer = (lambda th: m.inner_objective(th, x, SMALL)), (lambda th: m.outer_objective(th, x, SMALL))
    got, _ = hypergradient(theta0, phi, inner, outer, cfg)
    want = direct_hypergradient(theta0, phi, inner, outer, cfg)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("side_effect", [True, False])
def test_meta_round_rolls_back_theta_and_leaves_one_bn_update(side_effect):
    m = make_lmcl(meta_bn_side_effect=side_effect).double()
    x = images()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = Runner(m).optimizers[1]
    m.meta_step(x, SMALL, 0.1, opt)
    after = m.state_dict()
    probe = make_lmcl().double()
    probe.load_state_dict(before)
    with torch.no_grad():
        probe.forward_all(x)  # one train-mode forward at theta_0
    expected = probe.state_dict() if side_effect else before
    for k, v in after.items():
        if k.startswith("weight_net."):
            assert not torch.equal(v, before[k]), k  # phi stepped
        elif k == "meta_rounds":
            assert int(v) == 1
        else:
            assert torch.equal(v, expected[k]), k
    assert any(not torch.equal(probe.state_dict()[k], before[k]) for k in before if "running_mean" in k)


def test_meta_rounds_every_meta_every_batches_from_batch_zero_per_epoch(monkeypatch):
    m = make_lmcl(meta_every=3)
    runner = Runner(m)
    seen = []
    monkeypatch.setattr(m, "meta_step", lambda *a: seen.append((int(m.step_epoch), int(m.step_in_epoch))))
    x = images(dtype=torch.float32)
    for epoch, steps in ((0, 4), (1, 1)):
        for _ in range(steps):
            m.manual_step(x, SMALL, epoch, runner)
    assert seen == [(0, 0), (0, 3), (1, 0)]
    assert m.manual_optimization
    assert not make_lmcl(meta_every=0).manual_optimization


def test_the_meta_round_steps_phi_at_the_cohorts_current_lr():
    """The step's meta round gets the loss-weight optimizer (phi's group) and the lr the cohort's optimizer has
    now (its schedule), and changes phi alone (the networks stay at theta_0)."""
    m = make_lmcl(meta_every=1)
    runner = Runner(m)
    runner.optimizers[0].param_groups[0]["lr"] = 0.05
    calls = []
    real = m.meta_step

    def recording(images, labels, lr, weight_optimizer, average=None):
        calls.append((lr, weight_optimizer))
        return real(images, labels, lr, weight_optimizer, average)

    m.meta_step = recording
    phi = [p.detach().clone() for p in m.weight_net.parameters()]
    m.manual_step(images(dtype=torch.float32), SMALL, 0, runner)
    ((lr, weight_optimizer),) = calls
    assert lr == 0.05 and weight_optimizer is runner.optimizers[1]
    assert {id(p) for g in weight_optimizer.param_groups for p in g["params"]} == {
        id(p) for p in m.weight_net.parameters()
    }
    assert any(not torch.equal(a, b) for a, b in zip(phi, m.weight_net.parameters(), strict=True))


# ------------------------------------------------------------------------------------------------ golden
def fill_(module: nn.Module, seed: int = 0) -> None:
    """Deterministic weights by sorted name (the values loaded into both implementations for the golden run)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() > 1:
                p.copy_(r * (2.0 / p[0].numel()) ** 0.5)
            else:
                p.copy_(1 + 0.1 * r if name.endswith("weight") else 0.1 * r)


#: the reference code (winycg/L-MCL 2c0901e: multi_ResNet(20, ...), Sup_MCL_Loss_Meta, Aggregator,
#: LossWeightNetwork, MetaSGD) run on CPU in float64 on these weights and this batch (K = 10, 8 x 8 images, lr 0.1):
#: the main-step terms (CE ~ log 10 plus the deliberately non-standard init's spread; contrastive totals are sums
#: of 18 pairs), a few main-step gradients and the hypergradient of phi, as released (bug) and with the exact adjoint
GOLDEN_LOSSES = {
    "net0/ce_aux1": 1.9743476683777903,
    "net0/ce_aux2": 3.2985576249526076,
    "net0/ce_backbone": 3.9117464329119027,
    "net1/ce_aux1": 2.9189309657946425,
    "net1/ce_aux2": 3.014464391232825,
    "net1/ce_backbone": 3.200284488368452,
    "net0/ce_aggregated": 2.630513097288613,
    "net1/ce_aggregated": 2.72405304431666,
    "net0/kd": 1.9987157815283803,
    "net1/kd": 1.8236099737534825,
    "contrast/vcl": 3.3600963764955725,
    "contrast/soft_vcl": 2.1571650302428167,
    "contrast/icl": 3.677809201496971,
    "contrast/soft_icl": 2.358087606097046,
}
GOLDEN_GRADS = {
    "nets.0.backbone.fc.weight": [-0.23511054148981203, -0.5965876450139543, -0.5028595734996948],
    "nets.1.aux1.fc.bias": [-0.2246539575779321, -0.33471688159971363, -0.2916077401307515],
    "embeds.0.2.proj.0.weight": [0.01778670357015424, 0.01603225325715858, 0.01441190866936726],
    "aggregators.1.gate.2.bias": [-0.017298414904942185, -0.03183302001270336, 0.04913143491764553],
    "nets.0.backbone.conv1.weight": [0.311306565185619, 0.005223633246284953, -0.8720750024493624],
}
GOLDEN_OUTER = 1.0982765820340974  # L_out(theta_3): the six CE after three virtual steps on these 8 images
GOLDEN_PHI_GRAD = {
    True: {
        "proj.0.0.weight": [-1.6076310072655906e-05, -0.00017533128895109954, -0.0004726439184362569],
        "proj.1.2.bias": [0.00023624991896997784, -0.000561448237966578, 0.0002493765950203205],
        "abs_sum": 33.04547234822731,
    },
    False: {
        "proj.0.0.weight": [-1.669781977140349e-05, -0.00017126376168425173, -0.0004769419652214921],
        "proj.1.2.bias": [0.00024015745140158453, -0.0005762030178923444, 0.00026136443778940037],
        "abs_sum": 33.24661860930987,
    },
}


def check_phi_grad(grads: dict[str, torch.Tensor], want: dict) -> None:
    for k in ("proj.0.0.weight", "proj.1.2.bias"):
        torch.testing.assert_close(
            grads[k].flatten()[:3], torch.tensor(want[k], dtype=torch.float64), rtol=1e-9, atol=0
        )
    assert sum(float(g.abs().sum()) for g in grads.values()) == pytest.approx(want["abs_sum"], rel=1e-10)


def test_golden_values_of_the_reference_code():
    """The main step, then the meta round with the exact adjoint (functional, no state written) and as released."""
    m = make_lmcl().double()
    fill_(m)
    x = images(8)
    losses = m.training_step(x, LABELS, 0)
    for k, v in GOLDEN_LOSSES.items():
        assert float(losses[k].detach()) == pytest.approx(v, rel=1e-12), k
    sum(v for k, v in losses.items() if not k.startswith("stat/")).backward()
    params = dict(m.named_parameters())
    for k, v in GOLDEN_GRADS.items():
        want = torch.tensor(v, dtype=torch.float64)
        torch.testing.assert_close(params[k].grad.flatten()[:3], want, rtol=1e-10, atol=0)
    runner = Runner(m)
    runner.optimizers[0].step()
    names = [n for n, _ in m.weight_net.named_parameters()]
    exact = replace(m.meta_settings(0.1), adjoint_wd_bug=False)
    inner, outer = (lambda th: m.inner_objective(th, x, LABELS)), (lambda th: m.outer_objective(th, x, LABELS))
    theta0 = [p for _, _, p in m.theta()]
    grads, _ = hypergradient(theta0, list(m.weight_net.parameters()), inner, outer, exact)
    check_phi_grad(dict(zip(names, grads, strict=True)), GOLDEN_PHI_GRAD[False])
    outer_loss = m.meta_step(x, LABELS, 0.1, runner.optimizers[1])
    assert float(outer_loss) == pytest.approx(GOLDEN_OUTER, rel=1e-10)
    check_phi_grad({n: p.grad for n, p in m.weight_net.named_parameters()}, GOLDEN_PHI_GRAD[True])


# ------------------------------------------------------------------------------------------------ contract
def test_params_validation_names_the_key():
    for bad, key in (
        ({"num_nets": 1}, "num_nets"),
        ({"tau": 0.0}, "tau"),
        ({"icl_weight": -1.0}, "icl_weight"),
        ({"meta_every": -1}, "meta_every"),
        ({"inner_steps": 0}, "inner_steps"),
        ({"deploy_net": 2}, "deploy_net"),
    ):
        with pytest.raises(ConfigError, match=key):
            LMCLParams(**bad).validate()
    LMCLParams(meta_every=0, inner_steps=1).validate()  # the smallest accepted


def test_heads_deployment_and_groups():
    m = make_lmcl()
    heads = m.eval().eval_outputs(images(dtype=torch.float32))
    assert sorted(heads) == sorted(f"net{i}{s}" for i in range(2) for s in ("", "_aux1", "_aux2"))
    assert m.deploy_head == "net0" and m.deployed_member == 0
    second = make_lmcl(deploy_net=1)
    assert second.deploy_head == "net1" and second.deployed_member == 1
    fresh = create_model("resnet20", 10)
    fresh.load_state_dict(m.deployable().state_dict())
    groups = m.param_groups()
    assert [g.name for g in groups] == ["cohort", "loss_weights"]
    ids = [{id(p) for p in g.params} for g in groups]
    assert not ids[0] & ids[1] and len(ids[0]) + len(ids[1]) == len(list(m.parameters()))
    assert {id(p) for p in m.weight_net.parameters()} == ids[1]
    metrics = {
        f"{h}/top1": v
        for h, v in zip(
            ("net0", "net0_aux1", "net0_aux2", "net1", "net1_aux1", "net1_aux2"),
            (50.0, 52.0, 40.0, 30.0, 20.0, 10.0),
            strict=True,
        )
    }
    derived = m.derived_metrics(metrics)
    assert derived["net_avg/top1"] == 40.0 and derived["net0_max_heads/top1"] == 52.0
    assert derived["net1_max_heads/top1"] == 30.0 and derived["best_head/top1"] == 52.0


def test_heterogeneous_pair_builds_each_member():
    hp = LMCLParams()
    ctx = MethodContext(
        model="resnet20", num_classes=10, optim=OptimConfig(), params=hp, epochs=1, members=["resnet20", "wrn16_2_crd"]
    )
    m = LMCL(ctx)
    assert [n.feature_dim for n in m.nets] == [64, 128]
    assert m.head_networks()["net1_aux2"] == "wrn16_2_crd"
    assert [x.in_features for x in m.weight_net.proj[1]] == [128] * 3


HOMOGENEOUS = {
    "resnet32": "75.82", "resnet56": "77.51", "resnet110_bottleneck": "79.48", "wrn16_2_crd": "77.31",
    "wrn40_2_crd": "80.96", "shufflenetv2_x0_5": "72.61", "shufflenetv2_x1_0": "77.25", "hcgnet_a1": "81.66",
    "hcgnet_a2": "83.14",
}  # fmt: skip
HETEROGENEOUS = {
    ("resnet32", "resnet110_bottleneck"): ("75.82", "79.71"),
    ("resnet56", "resnet110_bottleneck"): ("77.04", "79.56"),
    ("wrn16_2_crd", "wrn40_2_crd"): ("76.88", "80.24"),
    ("wrn40_2_crd", "wrn28_4_crd"): ("80.42", "82.61"),
    ("resnet56", "wrn40_2_crd"): ("77.54", "80.72"),
    ("resnet110_bottleneck", "wrn28_4_crd"): ("80.02", "82.84"),
    ("shufflenetv2_x1_0", "resnet110_bottleneck"): ("76.85", "79.17"),
    ("shufflenetv2_x1_0", "wrn40_2_crd"): ("77.06", "80.29"),
}


def test_configs_are_every_published_cell_with_the_code_hyperparameters():
    """methods-mcl.md 2.10 and 4: one config per README cell (the pairs as model.members, net 0 first), the mcl
    recipe's schedule and data, the script's loss weights and meta settings; each cell's published rows."""
    cells = [(f"lmcl_{m}", [m, m]) for m in HOMOGENEOUS] + [(f"lmcl_{a}_{b}", [a, b]) for a, b in HETEROGENEOUS]
    for name, members in cells:
        cfg = load_config(f"cifar100/{name}")
        run, hp = cfg.run, cfg.method_params
        nets = [run.model.name] * 2 if run.model.members is None else list(run.model.members)
        assert (run.recipe, nets, hp.num_nets) == ("mcl", members, 2), name
        o, d = run.optim, run.data
        assert (run.train.epochs, o.lr, o.schedule, o.nesterov, o.momentum, o.weight_decay) == (
            300, 0.1, "cosine", True, 0.9, 5e-4,
        )  # fmt: skip
        assert (d.batch_size, d.sampler, d.m_per_class, d.pad, d.padding_mode, d.test_batch_size, run.seed) == (
            128, "m_per_class", 2, 4, "zeros", 128, 0,
        )  # fmt: skip
        assert (hp.tau, hp.temperature, hp.embed_dim) == (0.1, 3.0, 128)
        assert (hp.vcl_weight, hp.soft_vcl_weight, hp.icl_weight, hp.soft_icl_weight) == (0.1, 1.0, 0.1, 1.0)
        assert (hp.meta_every, hp.inner_steps, hp.meta_adjoint_wd_bug, hp.meta_bn_side_effect) == (50, 2, True, True)
    defaults = dataclasses.asdict(LMCLParams())
    for model, value in HOMOGENEOUS.items():
        rows = find_published("lmcl", model, "cifar100", defaults, defaults, recipe="mcl")
        assert [(r.value, r.head) for r in rows] == [(value, "best_head")], model
    for (a, b), values in HETEROGENEOUS.items():
        rows = find_published("lmcl", f"{a}+{b}", "cifar100", defaults, defaults, recipe="mcl")
        heads = ("net0_max_heads", "net1_max_heads")
        assert [(r.value, r.head) for r in rows] == list(zip(values, heads, strict=True)), (a, b)


@pytest.mark.slow
def test_lmcl_trains_and_resumes_exactly(cifar10_root, tmp_path):
    settings = {
        "model.name": "resnet20",
        "data.dataset": "cifar10",
        "data.sampler": "m_per_class",
        "data.limit_train": 96,
        "data.limit_test": 16,
        "data.batch_size": 4,
        "train.max_steps_per_epoch": 1,
        "method.name": "lmcl",
        "method.inner_steps": 1,  # the two-step default is covered above; one keeps this run short
    }
    full, resumed = helpers.train_and_resume(
        None, lambda name, epochs: helpers.quick_overrides(cifar10_root, tmp_path, name, epochs, settings)
    )
    helpers.assert_same_runs(full, resumed)
    assert int(torch.load(full / "last.pt", weights_only=False)["method"]["meta_rounds"]) == 2


def test_the_first_batch_without_positives_is_refused_and_later_batches_are_not_read():
    """One host read per process: the first batch is checked (a loader without class pairs fails at once), later
    steps are not synchronised (the class-balanced sampler gives their pairs)."""
    with pytest.raises(DataError, match="data.sampler=m_per_class"):
        make_lmcl().training_step(images(dtype=torch.float32), torch.tensor([0, 0, 1, 2]), 0)
    m = make_lmcl()
    m.training_step(images(dtype=torch.float32), torch.tensor([0, 0, 1, 1]), 0)
    later = m.training_step(images(dtype=torch.float32), torch.tensor([0, 0, 1, 2]), 0)
    assert torch.isnan(later["contrast/vcl"].detach()), "what the trainer's non-finite check then refuses"
