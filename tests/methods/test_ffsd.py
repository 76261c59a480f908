"""FFSD (``methods.md`` §1): loss terms by hand, gradient flow, equivalence with the official per-component
backward order, golden values, ablations, evaluation heads, deployment and a short end-to-end run."""

from __future__ import annotations

import copy
import math

import helpers
import pytest
import torch
import torch.nn.functional as F

import okd.methods.ffsd  # noqa: F401  (registers "ffsd" even before okd.methods imports it)
from okd.config import OptimConfig
from okd.errors import ConfigError
from okd.methods.base import METHODS, MethodContext
from okd.methods.ffsd import (
    FFSD,
    FFSDParams,
    attention_transfer_sum,
    mutual_learning_kl,
    sd_training_terms,
)
from okd.models import create_model
from okd.nn.diversity import diversity_feature_target

MODEL, NUM_CLASSES = "resnet20", 10


def make(seed: int = 0, **params) -> FFSD:
    torch.manual_seed(seed)
    ctx = MethodContext(
        model=MODEL,
        num_classes=NUM_CLASSES,
        optim=OptimConfig(weight_decay=1e-4),
        params=FFSDParams(**params),
        epochs=299,
    )
    return FFSD(ctx).train()


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.tensor([0, 3, 5, 9, 1, 2, 4, 6][:n])


def total(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(v for k, v in losses.items() if not k.startswith("stat/"))


def component_of(name: str) -> str:
    """Parameter name -> component: student{i}, leader, decoder, fusion, sd{i}, sdL."""
    head, _, rest = name.partition(".")
    if head == "students":
        return f"student{rest.split('.')[0]}"
    if head == "sd_students":
        return f"sd{int(rest.split('.')[0]) + 1}"
    return {"leader": "leader", "leader_decoder": "decoder", "fusion": "fusion", "sd_leader": "sdL"}[head]


def keys_for(m: int = 2, sd: str = "both", fusion: bool = True, diversity: bool = True) -> set[str]:
    keys = {"stat/warmup", "leader/ce", "leader/kl"}
    for i in range(m):
        keys |= {f"student{i}/ce", f"student{i}/kl"}
        if i and diversity:
            keys.add(f"student{i}/div")
        if i and sd in ("both", "students"):
            keys |= {f"student{i}/sd_div", f"sd{i}/feature", f"sd{i}/attention"}
    if fusion:
        keys |= {"fusion/ce", "fusion/kl", "leader/fused_att", "leader/decoder"}
        if sd in ("both", "leader"):
            keys |= {"leader/sd", "sdL/feature", "sdL/attention"}
    return keys


# ------------------------------------------------------------------------------------------------ by hand
def test_mutual_learning_kl_by_hand():
    # T = 2. Student 0 logits [0, 0] -> p = [1/2, 1/2]. Peer 1 logits [2 ln 3, 0] -> q = softmax([ln 3, 0]) =
    # [3/4, 1/4]; KL(q || p) = 3/4 ln(3/2) + 1/4 ln(1/2). Peer 2 equals student 0 -> KL 0.
    # = 0.3041 - 0.1733 = 0.1308. M = 3: (1/(M-1)) Σ_peers T² KL = 4 · 0.1308 / 2 = 0.2616.
    z = [t.requires_grad_(True) for t in (torch.zeros(1, 2), torch.tensor([[2 * math.log(3), 0.0]]), torch.zeros(1, 2))]
    hand = 4 * (0.75 * math.log(1.5) - 0.25 * math.log(2)) / 2
    out = mutual_learning_kl(z, 0, 2.0)
    assert out.item() == pytest.approx(hand, rel=1e-6)
    out.backward()
    assert z[0].grad is not None and z[0].grad.abs().sum() > 0
    assert z[1].grad is None and z[2].grad is None  # the peers' logits are detached targets


def test_attention_transfer_sum_by_hand():
    # one channel: att = square. s = [sqrt3, 2] -> att [3, 4] -> normalised [0.6, 0.8]; t = [2, sqrt3] ->
    # [0.8, 0.6]; NL2 = mean(0.2², 0.2²) = 0.04; identical pair -> 0. Sum over the two taps: 0.04.
    s = torch.tensor([math.sqrt(3), 2.0]).view(1, 1, 1, 2)
    t = torch.tensor([2.0, math.sqrt(3)]).view(1, 1, 1, 2)
    assert attention_transfer_sum([s, s], [t, s]).item() == pytest.approx(0.04, rel=1e-5)


def test_attention_transfer_sum_refuses_unpaired_maps():
    s = torch.ones(1, 1, 1, 2)
    with pytest.raises(ValueError, match=r"^1 source maps but 2 targets$"):
        attention_transfer_sum([s], [s, s])


def test_sd_training_terms_by_hand():
    # output o = [3, 4], tap t = [4, 3] (1 x 1 x 1 x 2):
    #   feature NL2 = mean((0.6-0.8)², (0.8-0.6)²) = 0.04;
    #   attention: att(o) = [9, 16] / sqrt(337), att(t) = [16, 9] / sqrt(337): NL2 = (49 + 49) / 337 / 2 = 49/337.
    o = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2).requires_grad_(True)
    t = torch.tensor([4.0, 3.0]).view(1, 1, 1, 2).requires_grad_(True)
    feat, att = sd_training_terms([o], [t])
    assert feat.item() == pytest.approx(0.04, rel=1e-5)
    assert att.item() == pytest.approx(49 / 337, rel=1e-5)
    (feat + att).backward()
    assert o.grad is not None and t.grad is None  # the taps are targets only
    with pytest.raises(ValueError):  # one output per tap: a missing tap is an error, not a shorter sum
        sd_training_terms([o, o], [t])


def test_warmup_factor_is_one_based_and_applied_to_lambda_terms():
    m = make()
    x, y = batch(2)
    factors = [make().training_step(x, y, epoch)["stat/warmup"].item() for epoch in range(6)]
    assert factors == pytest.approx([math.exp(-5 * (1 - e / 5) ** 2) for e in (1, 2, 3, 4, 5)] + [1.0])
    assert factors[:4] == pytest.approx([0.0408, 0.1653, 0.4493, 0.8187], abs=1e-4)
    # same weights and BN state for both calls: λ-weighted terms scale by the factor, CE/KL do not
    early = copy.deepcopy(m).training_step(x, y, 0)
    late = copy.deepcopy(m).training_step(x, y, 4)
    for key in late:
        if key == "stat/warmup":
            continue
        weighted = key.endswith(("/div", "/sd_div", "/fused_att", "/decoder", "/sd", "/feature", "/attention"))
        ratio = factors[0] if weighted else 1.0
        assert early[key].item() == pytest.approx(ratio * late[key].item(), rel=1e-5), key


# --------------------------------------------------------------------------------------------- golden values
# resnet20, K = 10, seed 0, batch() of 4 images, epoch index 4 (e = 5, warm-up factor 1), fresh method.
# Explainable magnitudes: CE ≈ ln 10 = 2.30 at init; KL terms O(0.1) between untrained nets at T = 2;
# student1/div ≈ 1e-5 · D with D ≈ (2/3)·n_y² (t ≈ n_y - ŷ on the top two-thirds; n_y, the un-normalised
# norm of student 0's 8x8 attention map, is 19-23 here);
# student1/sd_div ≈ 1e-5 · NL2 (tiny); the leader's feature terms 10 · NL2 with NL2 O(1e-3) on 8x8 maps;
# the SD training terms 1000 · Σ NL2 over 16x16 and 32x32 maps (feature maps flattened over C·H·W).
GOLDEN = {
    "student0/ce": 2.5543088912963867,
    "student0/kl": 0.21554824709892273,
    "student1/ce": 2.3143129348754883,
    "student1/kl": 0.2728014588356018,
    "student1/div": 0.002832896076142788,
    "student1/sd_div": 3.824155569986942e-08,
    "fusion/ce": 2.259752035140991,
    "fusion/kl": 0.10967881977558136,
    "leader/ce": 2.5016069412231445,
    "leader/kl": 0.14248068630695343,
    "leader/fused_att": 0.021300680935382843,
    "leader/decoder": 0.022101927548646927,
    "leader/sd": 0.024409256875514984,
    "sd1/feature": 0.23380786180496216,
    "sd1/attention": 2.855320453643799,
    "sdL/feature": 0.2308482974767685,
    "sdL/attention": 2.5149405002593994,
    "stat/warmup": 1.0,
}


def test_golden_loss_dict():
    losses = make().training_step(*batch(), epoch=4)
    assert set(losses) == set(GOLDEN)
    for key, value in GOLDEN.items():
        assert losses[key].item() == pytest.approx(value, rel=2e-4, abs=1e-9), key


# ------------------------------------------------------------------------------------------- gradient flow
def expected_reach(key: str) -> set[str]:
    if key == "leader/decoder":
        return {"leader", "decoder"}  # the decoder reads the leader's deepest tap
    return {key.split("/")[0]}  # student{i}, fusion, leader (backbone only), sd{i}, sdL


@pytest.mark.parametrize("num_students", [2, 3])
def test_each_loss_reaches_only_its_own_component(num_students):
    m = make(num_students=num_students)
    named = [(n, p) for n, p in m.named_parameters()]
    losses = m.training_step(*batch(), epoch=4)
    assert set(losses) == keys_for(num_students)
    for key, value in losses.items():
        if key.startswith("stat/"):
            continue
        grads = torch.autograd.grad(value, [p for _, p in named], retain_graph=True, allow_unused=True)
        reached = {component_of(n) for (n, _), g in zip(named, grads, strict=True) if g is not None and g.any()}
        assert reached == expected_reach(key), key


def test_diversity_chain_is_one_way_and_targets_carry_no_graph():
    m = make(num_students=3)
    calls: list[tuple[str, bool, bool, bool]] = []

    def spy(name):
        def hook(module, args):
            calls.append((name, module.training, torch.is_grad_enabled(), args[0].requires_grad))

        return hook

    for i, g in enumerate(m.sd_students, start=1):
        g.register_forward_pre_hook(spy(f"sd{i}"))
    m.sd_leader.register_forward_pre_hook(spy("sdL"))
    losses = m.training_step(*batch(), epoch=4)
    # targets first (eval mode, no graph, detached input), then each SD module trained (train mode, graph)
    assert calls == [
        ("sd1", False, False, False),
        ("sd2", False, False, False),
        ("sdL", False, False, False),
        ("sd1", True, True, False),
        ("sd2", True, True, False),
        ("sdL", True, True, False),
    ]
    assert all(g.training for g in m.sd_students) and m.sd_leader.training  # modes restored
    s1 = list(m.students[1].parameters())
    for key in ("student2/div", "student2/sd_div"):
        grads = torch.autograd.grad(losses[key], s1, retain_graph=True, allow_unused=True)
        assert all(g is None for g in grads), key


def test_sd_targets_are_made_before_the_sd_modules_train():
    # the eval-mode targets use the running statistics from *before* this step's train-mode forward
    m = make()
    x, y = batch()
    before = copy.deepcopy(m.sd_students[0]).eval()
    probe = copy.deepcopy(m)  # same weights: train-mode forwards give the step's taps exactly
    taps = [s.forward_taps(x)[1] for s in probe.students]
    with torch.no_grad():
        expected = before(diversity_feature_target(taps[0][-1]))
    out = m.training_step(x, y, 4)
    hand = 1e-5 * attention_transfer_sum(taps[1][:-1], expected)
    assert out["student1/sd_div"].item() == pytest.approx(hand.item(), rel=1e-5)
    # ... and the train-mode forward updated them afterwards
    assert not torch.equal(m.sd_students[0].blocks[0][1].running_mean, before.blocks[0][1].running_mean)


# ------------------------------------------------------------------ equivalence with the official loop order
def reference_iteration(ref: FFSD, x: torch.Tensor, y: torch.Tensor, epoch: int):
    """The official CIFAR trainer's iteration (§1.5), written independently of okd.nn: all forwards, then per
    component (students in order, fusion, leader, SD modules) zero_grad -> backward -> *step*. A step before a
    later backward would break that backward if any cross-network quantity were not detached."""
    m, temp, bsz = len(ref.students), 2.0, x.shape[0]
    e = epoch + 1
    w = math.exp(-5 * (1 - e / 5) ** 2) if e <= 5 else 1.0
    lam_div, lam_fus, lam_sd = 1e-5 * w, 10.0 * w, 1000.0 * w

    def att(f):
        return f.pow(2).mean(1, keepdim=True)

    def nl2(a, b):
        return (F.normalize(a.reshape(bsz, -1)) - F.normalize(b.reshape(bsz, -1))).pow(2).mean()

    def kl(s, t):
        return temp**2 * F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="batchmean")

    def div_target(a):
        n = a.reshape(bsz, -1).norm(dim=1, keepdim=True)
        a = F.normalize(a.reshape(bsz, -1))
        thr = a.topk(int(a.size(1) / 3), largest=False)[0][:, -1].unsqueeze(-1)
        return (n / 2 - a) * torch.sign(a - thr) + n / 2, a, n

    def div_loss(xa, ya):
        t, _, _ = div_target(ya)
        return (F.normalize(xa.reshape(bsz, -1)) - t).pow(2).mean()

    def psi(f):
        a = att(f)
        t, ah, n = div_target(a)
        return f + ((t - ah) * n / f.size(1)).view(a.size())

    def sd_pull(sd, source, inp):
        sd.eval()
        outs = sd(inp.detach())  # as the official code: a graph is built, the outputs are detached
        return sum(nl2(att(source[j]), att(o.detach())) for j, o in enumerate(outs))

    def sd_train(sd, taps):
        sd.train()
        outs = sd(taps[-1].detach())
        f = sum(lam_sd * nl2(o, taps[j].detach()) for j, o in enumerate(outs))
        a = sum(lam_sd * nl2(att(o), att(taps[j].detach())) for j, o in enumerate(outs))
        return f, a

    def sgd(mod, wd=1e-4):
        return torch.optim.SGD(mod.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd)

    losses, grads = {}, {}

    def backward_and_step(prefix, module, loss, opt):
        opt.zero_grad()
        loss.backward()
        for n, p in module.named_parameters():
            grads[f"{prefix}.{n}"] = p.grad.clone()
        opt.step()

    zl, A = ref.leader.forward_taps(x)
    dl = ref.leader_decoder(A[-1])
    outs, feats = [], []
    for s in ref.students:
        z, t = s.forward_taps(x)
        outs.append(z)
        feats.append(t)
    u = torch.cat([f[-1].detach() for f in feats], 1)
    zf, phi = ref.fusion(u)
    ens = sum(outs) / m

    for i in range(m):
        losses[f"student{i}/ce"] = F.cross_entropy(outs[i], y)
        losses[f"student{i}/kl"] = sum(kl(outs[i], outs[j].detach()) for j in range(m) if j != i) / (m - 1)
        if i:
            losses[f"student{i}/div"] = lam_div * div_loss(att(feats[i][-1]), att(feats[i - 1][-1].detach()))
            losses[f"student{i}/sd_div"] = lam_div * sd_pull(
                ref.sd_students[i - 1], feats[i], psi(feats[i - 1][-1].detach())
            )
        loss = sum(v for k, v in losses.items() if k.startswith(f"student{i}/"))
        backward_and_step(f"students.{i}", ref.students[i], loss, sgd(ref.students[i]))

    losses["fusion/ce"] = F.cross_entropy(zf, y)
    losses["fusion/kl"] = kl(zf, ens.detach())
    loss = losses["fusion/ce"] + losses["fusion/kl"]
    backward_and_step("fusion", ref.fusion, loss, sgd(ref.fusion, 1e-5))

    losses["leader/ce"] = F.cross_entropy(zl, y)
    losses["leader/kl"] = kl(zl, zf.detach())
    losses["leader/fused_att"] = lam_fus * nl2(att(A[-1]), att(phi.detach()))
    losses["leader/decoder"] = lam_fus * nl2(att(dl), att(u))
    losses["leader/sd"] = lam_fus * sd_pull(ref.sd_leader, A, phi.detach())
    loss = sum(v for k, v in losses.items() if k.startswith("leader/"))
    leader_opt = torch.optim.SGD(
        list(ref.leader.parameters()) + list(ref.leader_decoder.parameters()), lr=0.1, momentum=0.9, nesterov=True
    )
    leader_opt.zero_grad()
    loss.backward()
    for prefix, mod in (("leader", ref.leader), ("leader_decoder", ref.leader_decoder)):
        for n, p in mod.named_parameters():
            grads[f"{prefix}.{n}"] = p.grad.clone()
    leader_opt.step()

    for i in range(1, m):
        g = ref.sd_students[i - 1]
        f, a = sd_train(g, feats[i])
        losses[f"sd{i}/feature"], losses[f"sd{i}/attention"] = f, a
        backward_and_step(f"sd_students.{i - 1}", g, f + a, torch.optim.Adam(g.parameters(), weight_decay=1e-4))
    f, a = sd_train(ref.sd_leader, A)
    losses["sdL/feature"], losses["sdL/attention"] = f, a
    backward_and_step("sd_leader", ref.sd_leader, f + a, torch.optim.Adam(ref.sd_leader.parameters()))
    return losses, grads


@pytest.mark.parametrize("num_students,epoch", [(2, 0), (3, 7)])
def test_single_backward_equals_official_per_component_order(num_students, epoch):
    m = make(num_students=num_students)
    ref = copy.deepcopy(m)
    x, y = batch()
    losses = m.training_step(x, y, epoch)
    total(losses).backward()
    ref_losses, ref_grads = reference_iteration(ref, x, y, epoch)

    assert set(ref_losses) == set(losses) - {"stat/warmup"}
    for key, value in ref_losses.items():
        assert losses[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-12), key
    params = dict(m.named_parameters())
    assert set(ref_grads) == set(params)
    for name, g in ref_grads.items():
        # float32 summation-order noise only: relative to the tensor's largest entry
        err = (params[name].grad - g).abs().max().item()
        assert err <= 2e-5 * g.abs().max().item() + 1e-10, (name, err)
    # identical forwards in identical modes: every BN buffer (incl. the SD modules') agrees afterwards
    ref_buffers = dict(ref.named_buffers())
    for name, buf in m.named_buffers():
        torch.testing.assert_close(buf, ref_buffers[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------- ablations
ABLATIONS = [
    ({}, keys_for()),
    ({"self_distillation": "none"}, keys_for(sd="none")),
    ({"self_distillation": "students"}, keys_for(sd="students")),
    ({"self_distillation": "leader"}, keys_for(sd="leader")),
    ({"diversity": "none"}, keys_for(diversity=False)),
    ({"diversity": "l2"}, keys_for()),
    ({"feature_fusion": False, "self_distillation": "students"}, keys_for(sd="students", fusion=False)),
    ({"feature_fusion": False, "self_distillation": "none"}, keys_for(sd="none", fusion=False)),
    ({"num_students": 4}, keys_for(4)),
]


@pytest.mark.parametrize("params,keys", ABLATIONS, ids=[str(p) for p, _ in ABLATIONS])
def test_ablations_drop_exactly_their_terms(params, keys):
    full = make()
    x, y = batch()
    reference = copy.deepcopy(full).training_step(x, y, 4)
    ablated = make(**params)
    if params.get("num_students", 2) == 2:
        # same weights for the modules both have; the ablated cohort's modules are a subset
        missing, unexpected = ablated.load_state_dict(full.state_dict(), strict=False)
        assert not missing
    losses = ablated.training_step(x, y, 4)
    assert set(losses) == keys
    groups = {g.name for g in ablated.param_groups()}
    assert ("fusion" in groups) == ("fusion/ce" in keys)
    assert {n for n in groups if n.startswith("sd")} == {k.split("/")[0] for k in keys if k.startswith("sd")}
    if params.get("num_students", 2) != 2:
        return
    changed = set()
    if params.get("diversity") == "l2":
        changed.add("student1/div")
    if params.get("feature_fusion") is False:
        changed.add("leader/kl")
    for key in keys - changed:
        assert losses[key].item() == pytest.approx(reference[key].item(), rel=1e-5), key


def test_no_feature_fusion_leader_learns_from_students_mean_logits():
    m = make(feature_fusion=False, self_distillation="students")
    assert m.fusion is None and m.leader_decoder is None and m.sd_leader is None
    x, y = batch()
    probe = copy.deepcopy(m)
    zl = probe.leader(x)
    ens = torch.stack([s(x) for s in probe.students]).mean(0)
    hand = 4 * F.kl_div(F.log_softmax(zl / 2, 1), F.softmax(ens / 2, 1), reduction="batchmean")
    assert m.training_step(x, y, 4)["leader/kl"].item() == pytest.approx(hand.item(), rel=1e-5)
    heads = m.eval().eval_outputs(x)
    assert "fusion" not in heads
    leader_group = next(g for g in m.param_groups() if g.name == "leader")
    assert len(leader_group.params) == len(list(m.leader.parameters()))


@pytest.mark.parametrize("sd,taps", [("both", [2]), ("none", [0, 1, 2]), ("leader", [0, 1, 2])])
def test_l2_diversity_variant(sd, taps):
    # "L2" (no student SD): all taps; "L2 with SD": only the last tap; -λ_div Σ NL2(att(T_1^j), att(T_0^j))
    m = make(diversity="l2", self_distillation=sd)
    x, y = batch()
    probe = copy.deepcopy(m)
    t0 = probe.students[0].forward_taps(x)[1]
    t1 = probe.students[1].forward_taps(x)[1]
    hand = -1e-5 * sum(
        F.mse_loss(F.normalize(t1[j].pow(2).mean(1).flatten(1)), F.normalize(t0[j].pow(2).mean(1).flatten(1))).item()
        for j in taps
    )
    value = m.training_step(x, y, 4)["student1/div"].item()
    assert value < 0
    assert value == pytest.approx(hand, rel=1e-5)


def test_explicit_l2_taps_override():
    assert make(diversity="l2", l2_diversity_taps="all")._l2_taps(3) == [0, 1, 2]
    assert make(diversity="l2", l2_diversity_taps="last", self_distillation="none")._l2_taps(3) == [2]


@pytest.mark.parametrize(
    "params,text",
    [
        ({"num_students": 1}, "num_students"),
        ({"num_students": 2.5}, "num_students"),
        ({"temperature": 0.0}, "temperature"),
        ({"lambda_fusion": -1.0}, "lambda_fusion"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"sd_lr": 0.0}, "sd_lr"),
        ({"self_distillation": "all"}, "both, students, leader, none"),
        ({"diversity": "cosine"}, "attention, l2, none"),
        ({"l2_diversity_taps": "first"}, "auto, all, last"),
        ({"feature_fusion": False}, "feature_fusion"),
    ],
)
def test_bad_params_raise_config_error(params, text):
    with pytest.raises(ConfigError, match=text):
        FFSDParams(**params).validate()


# --------------------------------------------------------------------------------- optimizers, heads, deploy
def test_param_groups_per_component():
    m = make(num_students=3)
    groups = {g.name: g for g in m.param_groups()}
    assert list(groups) == ["student0", "student1", "student2", "leader", "fusion", "sd1", "sd2", "sdL"]
    for name in ("student0", "student1", "student2", "leader", "fusion"):
        g = groups[name]
        assert (g.optimizer, g.lr, g.momentum, g.nesterov) == ("sgd", 0.1, 0.9, True)
        assert g.weight_decay == (1e-5 if name == "fusion" else 1e-4)
    for name in ("sd1", "sd2", "sdL"):
        g = groups[name]
        assert (g.optimizer, g.lr, g.weight_decay, g.betas, g.eps) == ("adam", 1e-3, 1e-4, (0.9, 0.999), 1e-8)
    owner = {}
    for g in groups.values():
        for p in g.params:
            assert id(p) not in owner
            owner[id(p)] = g.name
    assert len(owner) == len(list(m.parameters()))
    assert all(owner[id(p)] == "leader" for p in m.leader_decoder.parameters())
    assert m.fusion.conv1.in_channels == 3 * 64 and m.leader_decoder.conv2.out_channels == 3 * 64


def test_eval_heads_and_oracle():
    m = make().eval()
    x, _ = batch()
    with torch.no_grad():
        heads = m.eval_outputs(x)
        zs = [s(x) for s in m.students]
        deepest = torch.cat([s.forward_taps(x)[1][-1] for s in m.students], 1)
        assert list(heads) == ["leader", "student0", "student1", "fusion", "students_mean_logits", "ensemble"]
        torch.testing.assert_close(heads["leader"], m.leader(x))
        torch.testing.assert_close(heads["fusion"], m.fusion(deepest)[0])
        torch.testing.assert_close(heads["students_mean_logits"], (zs[0] + zs[1]) / 2)
        probs = (zs[0].softmax(1) + zs[1].softmax(1)) / 2
        torch.testing.assert_close(heads["ensemble"].exp(), probs)
    assert m.oracle_groups() == {"oracle_any_student_correct": ["student0", "student1"]}
    assert FFSD.deploy_head == "leader" and "ffsd" in METHODS


def test_deployable_is_the_plain_leader_backbone():
    m = make()
    state = m.deployable().state_dict()
    plain = create_model(MODEL, NUM_CLASSES)
    plain.load_state_dict(state)  # strict: exactly a plain backbone
    dropped = {k for k in m.state_dict() if k.startswith("leader")} - {f"leader.{k}" for k in state}
    assert dropped and all(k.startswith("leader_decoder.") for k in dropped)
    x, _ = batch()
    torch.testing.assert_close(plain.eval()(x), m.eval().leader(x))


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_end_to_end_every_head_and_loss_logged_and_resume_exact(cifar10_root, tmp_path):
    from okd.io import load_checkpoint
    from okd.runs.metrics import read_metrics_csv

    def overrides(name, epochs):
        settings = {
            "data.limit_train": 96,
            "data.limit_test": 100,
            "data.batch_size": 16,
            "data.test_batch_size": 100,
            "train.max_steps_per_epoch": 3,
        }
        return helpers.quick_overrides(cifar10_root, tmp_path, name, epochs, settings)

    run, resumed = helpers.train_and_resume("cifar10/ffsd_resnet20", overrides)
    rows = read_metrics_csv(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in keys_for() | {"loss"}:
        assert f"train/{key}" in rows[0], key
    heads = ["leader", "student0", "student1", "fusion", "students_mean_logits", "ensemble"]
    for head in heads + ["oracle_any_student_correct"]:
        assert f"test/{head}/top1" in rows[-1], head
    for group in ("student0", "student1", "leader", "fusion", "sd1", "sdL"):
        assert f"lr/{group}" in rows[-1], group
    assert rows[0]["train/stat/warmup"] == pytest.approx(math.exp(-5 * 0.64), rel=1e-5)
    deploy = load_checkpoint(run / "deploy.pt")
    create_model(deploy["model"], deploy["num_classes"]).load_state_dict(deploy["state_dict"])
    helpers.assert_same_runs(run, resumed)
