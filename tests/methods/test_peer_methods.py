"""The peer methods (DML, KD, ONE, CL-ILR, individual, OKDDip, FFL, DML+SL, ONE+SL), ``methods.md`` §2-§6, §9.

Each loss is recomputed here from the networks' outputs with independent code written from the equations;
gradient flow is checked for every detach policy; golden values pin each loss dict on fixed inputs; every
method trains end to end through the trainer on a real CIFAR-10 subset and resumes exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import helpers
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okd.config import OptimConfig
from okd.errors import CheckpointError, ConfigError
from okd.methods import cl_ilr, dml, ffl, individual, kd, leader_sl, okddip, one  # noqa: F401
from okd.methods.base import METHODS, MethodContext
from okd.methods.build import build_config, load_config
from okd.models import create_model
from okd.nn.losses import rampup_0based

PEER_METHODS = ["dml", "kd", "one", "cl_ilr", "individual", "okddip", "ffl", "dml_sl", "one_sl"]
K = 10


# ----------------------------------------------------------------------------------------------- helpers
def make(name: str, model: str = "resnet20", seed: int = 0, **params) -> nn.Module:
    hp = METHODS.get(name).Params(**params)
    hp.validate()
    ctx = MethodContext(model=model, num_classes=K, optim=OptimConfig(), params=hp, epochs=300)
    torch.manual_seed(seed)
    return METHODS.get(name)(ctx)


def batch(n: int = 4, seed: int = 1, size: int = 16) -> tuple[Tensor, Tensor]:
    """Small images keep the tests fast: the CIFAR nets pool globally, so 16x16 inputs run unchanged."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, K, (n,), generator=g)


ref_kl, ref_ce = helpers.ref_kl, helpers.ref_ce


def summed(losses: dict[str, Tensor], pick=lambda k: True) -> Tensor:
    return sum(v for k, v in losses.items() if not k.startswith("stat/") and pick(k))


def grads_of(module: nn.Module) -> list[Tensor | None]:
    return [p.grad for p in module.parameters()]


def no_grad_in(module: nn.Module) -> bool:
    return all(p.grad is None or not p.grad.any() for p in module.parameters())


def some_grad_in(module: nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def close(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(create_model("resnet20", K).state_dict(), path)
    return path


# ------------------------------------------------------------------------------- tiny-tensor equations
def test_kl_div_t_matches_a_hand_computation():
    """KL_T of okd and the tests' reference, against numbers worked out by hand (q = (3/4, 1/4), p = (1/2, 1/2))."""
    from okd.nn.losses import kl_div_t

    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert ref_kl(s, t, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert kl_div_t(s, t, 1.0, detach_target=True).item() == pytest.approx(expected, rel=1e-6)
    # at T = 2 the logits are halved (q = softmax(log(3)/2, 0)) and the KL is scaled by T^2 = 4 unless told not to
    q0 = math.sqrt(3) / (math.sqrt(3) + 1)
    at_2 = q0 * math.log(2 * q0) + (1 - q0) * math.log(2 * (1 - q0))
    assert kl_div_t(s, t, 2.0, detach_target=True).item() == pytest.approx(4 * at_2, rel=1e-6)
    assert kl_div_t(s, t, 2.0, detach_target=True, scale_t2=False).item() == pytest.approx(at_2, rel=1e-6)
    # target_eps adds to q before the log: sum (q + eps) (log(q + eps) - log p)
    eps = 0.05
    with_eps = sum((q + eps) * math.log((q + eps) / 0.5) for q in (0.75, 0.25))
    assert kl_div_t(s, t, 1.0, detach_target=True, target_eps=eps).item() == pytest.approx(with_eps, rel=1e-6)
    # batch mean: a second, identical-target row with KL 0 halves the value
    two = kl_div_t(torch.cat([s, t]), torch.cat([t, t]), 1.0, detach_target=True)
    assert two.item() == pytest.approx(expected / 2, rel=1e-6)


def test_one_gated_teacher_is_the_gate_weighted_logit_sum():
    z = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])]
    g = torch.tensor([[0.25, 0.75]])
    close(one.gated_logits(z, g), torch.tensor([[0.25 * 1 + 0.75 * 3, 0.25 * 2 - 0.75]]))


def test_cl_targets_are_the_mean_of_the_other_branches():
    z = [torch.full((1, 2), v) for v in (1.0, 2.0, 6.0)]
    close(cl_ilr.mean_of_others(z, 0), torch.full((1, 2), 4.0))
    close(cl_ilr.mean_of_others(z, 2), torch.full((1, 2), 1.5))
    zs = [torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])]
    T = 2.0
    target = cl_ilr.mean_of_other_probs_as_logits(zs, 2, T)
    expected = (torch.softmax(zs[0] / T, 1) + torch.softmax(zs[1] / T, 1)) / 2
    close(torch.softmax(target / T, 1), expected)


def test_grad_scale_is_identity_forward_and_scaled_backward():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = cl_ilr.grad_scale(x, 0.25)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([4.0, 8.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0]))


def test_okddip_attention_on_tiny_tensors():
    att = okddip.PeerAttention(2, 1)
    with torch.no_grad():
        att.query.weight.copy_(torch.tensor([[1.0, 0.0]]))
        att.key.weight.copy_(torch.tensor([[0.0, 1.0]]))
    h = [torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 1.0]])]  # q = (1, 2), k = (0, 1)
    alpha = att(h)[0]
    # e_ab = q_a k_b: row 0 = (0, 1), row 1 = (0, 2); softmax over b including b = a
    expected = torch.stack([torch.softmax(torch.tensor([0.0, 1.0]), 0), torch.softmax(torch.tensor([0.0, 2.0]), 0)])
    close(alpha, expected)
    z = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    close(okddip.attention_targets(att(h), z)[0], expected)  # one-hot logits pick the weights
    no_self = okddip.PeerAttention(2, 1, self_attention=False)
    close(no_self(h)[0], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_okddip_diversity_statistic():
    z = [torch.tensor([[0.0, 0.0]]), torch.tensor([[100.0, 0.0]]), torch.tensor([[0.0, 0.0]])]
    d = math.sqrt(0.5)  # |(1/2, 1/2) - (1, 0)|
    assert okddip.peer_diversity(z).item() == pytest.approx((d + 0 + d) / 3, rel=1e-5)


def test_dml_terms_pairwise_and_mean_of_others():
    z = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([[0.0, 0.0, 3.0]])]
    hp = dml.DMLParams(num_nets=3, temperature=2.0)
    close(dml.dml_kl(z, 0, hp), (ref_kl(z[0], z[1], 2.0) + ref_kl(z[0], z[2], 2.0)) / 2)
    hp = dml.DMLParams(num_nets=3, temperature=2.0, target="mean_of_others", target_eps=1e-7)
    close(dml.dml_kl(z, 1, hp), ref_kl(z[1], (z[0] + z[2]) / 2, 2.0, eps=1e-7))


def test_dml_kl_weight_and_unscaled_kl():
    """``kl_weight`` multiplies each net's KL; ``scale_t2=false`` drops the T^2 factor (CE unchanged)."""
    z = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([[0.5, 0.0, 3.0]])]
    y = torch.tensor([2])
    kl0 = (ref_kl(z[0], z[1], 2.0) + ref_kl(z[0], z[2], 2.0)) / 2
    losses = dml.dml_losses(z, y, dml.DMLParams(num_nets=3, temperature=2.0, kl_weight=0.3))
    close(losses["net0/kl"], 0.3 * kl0)
    close(losses["net0/ce"], ref_ce(z[0], y))
    losses = dml.dml_losses(z, y, dml.DMLParams(num_nets=3, temperature=2.0, kl_weight=0.3, scale_t2=False))
    close(losses["net0/kl"], 0.3 * kl0 / 4.0)
    hp = dml.DMLParams(num_nets=3, temperature=2.0, target="mean_of_others", scale_t2=False)
    close(dml.dml_kl(z, 2, hp), ref_kl(z[2], (z[0] + z[1]) / 2, 2.0) / 4.0)
    # through the method's own training step: the same weights applied to the nets' logits
    m = make("dml", kl_weight=0.3, temperature=2.0)
    x, y = batch()
    m.train()
    losses = m.training_step(x, y, 0)
    logits = [net(x) for net in m.nets]  # train mode again: the same batch statistics, the same logits
    for i in range(2):
        close(losses[f"net{i}/kl"], 0.3 * ref_kl(logits[i], logits[1 - i].detach(), 2.0))


def test_one_kl_weight_scales_the_ramped_kl():
    m = make("one", kl_weight=0.4)
    m.train()
    x, y = batch()
    epoch = 40
    losses = m.training_step(x, y, epoch)
    ref, _, _ = one_ref(m, x, y, epoch)
    assert losses["stat/kl_weight"].item() == pytest.approx(0.4 * ramp(epoch), rel=1e-6)
    for i in range(4):
        close(losses[f"branch{i}/kl"], 0.4 * ref[f"branch{i}/kl"])
        close(losses[f"branch{i}/ce"], ref[f"branch{i}/ce"])
    close(losses["teacher/ce"], ref["teacher/ce"])


def test_one_gate_batchnorm_uses_momentum_0_1():
    gate = one.Gate(16, 4)
    assert helpers.assert_bn_updates_with_momentum_0_1(gate, torch.randn(8, 16, 4, 4)) == 1


# ---------------------------------------------------------------------- each loss dict vs its equation
def ramp(epoch: int) -> float:
    return math.exp(-5 * (1 - min(epoch, 80) / 80) ** 2)


def branch_outputs(m, x: Tensor, trunk_grad_scale: float = 1.0) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Trunk, final maps and logits of a ResNet multi-branch net, run by hand (ILR via a tensor hook)."""
    h = m.net.trunk(x)
    hb = h.view_as(h)
    if trunk_grad_scale != 1.0:
        hb.register_hook(lambda g: g * trunk_grad_scale)
    maps = [b["layer3"](hb) for b in m.net.branches]
    return h, maps, [b["fc"](f.mean((2, 3))) for b, f in zip(m.net.branches, maps, strict=True)]


def gate_ref(gate, h: Tensor) -> Tensor:
    a = F.linear(h.mean((2, 3)), gate.fc.weight, gate.fc.bias)
    a = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + gate.bn.eps) * gate.bn.weight + gate.bn.bias
    return torch.softmax(a.clamp_min(0), dim=1)


def fusion_ref(fusion, u: Tensor) -> tuple[Tensor, Tensor]:
    phi = fusion.relu2(fusion.bn2(fusion.conv2(fusion.relu1(fusion.bn1(fusion.conv1(u))))))
    return F.linear(phi.mean((2, 3)), fusion.fc.weight, fusion.fc.bias), phi


def att(f: Tensor) -> Tensor:
    return (f**2).mean(1).flatten(1)


def nl2(a: Tensor, b: Tensor) -> Tensor:
    return ((a / a.norm(dim=1, keepdim=True) - b / b.norm(dim=1, keepdim=True)) ** 2).mean()


def one_ref(m, x: Tensor, y: Tensor, epoch: int) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor]]:
    h, maps, z = branch_outputs(m, x)
    g = gate_ref(m.gate, h)
    z_e = sum(g[:, i : i + 1] * z[i] for i in range(len(z)))
    out = {f"branch{i}/ce": ref_ce(zi, y) for i, zi in enumerate(z)}
    out.update({f"branch{i}/kl": ramp(epoch) * ref_kl(zi, z_e, 3.0, 1e-7) for i, zi in enumerate(z)})
    out["teacher/ce"] = ref_ce(z_e, y)
    return out, maps, z


def sl_ref(m, x: Tensor, y: Tensor, epoch: int, maps: list[Tensor], z: list[Tensor]) -> dict[str, Tensor]:
    """FFSD's leader strategy: fusion over detached peer maps, leader with its decoder (T = 2, lambda 10)."""
    u = torch.cat([f.detach() for f in maps], 1)
    z_f, phi = fusion_ref(m.sl.fusion, u)
    z_l, taps = m.sl.leader.forward_taps(x)
    lam = 10 * math.exp(-5 * (1 - min(epoch + 1, 5) / 5) ** 2)
    return {
        "fusion/ce": ref_ce(z_f, y),
        "fusion/kl": ref_kl(z_f, (sum(z) / len(z)).detach(), 2.0),
        "leader/ce": ref_ce(z_l, y),
        "leader/kl": ref_kl(z_l, z_f.detach(), 2.0),
        "leader/fused_map": lam * nl2(att(taps[-1]), att(phi.detach())),
        "leader/decoder": lam * nl2(att(m.sl.decoder(taps[-1])), att(u)),
    }


def reference_losses(name: str, m, x: Tensor, y: Tensor, epoch: int) -> dict[str, Tensor]:
    """Every method's loss terms written from ``methods.md`` (default detach policies), independently of okd."""
    w = ramp(epoch)
    if name in ("dml", "dml_sl"):
        outs = [net.forward_taps(x) for net in m.nets]
        z = [o[0] for o in outs]
        out = {}
        for i, zi in enumerate(z):
            others = [ref_kl(zi, zj.detach(), 3.0) for j, zj in enumerate(z) if j != i]
            out[f"net{i}/ce"], out[f"net{i}/kl"] = ref_ce(zi, y), sum(others) / len(others)
        if name == "dml_sl":
            out.update(sl_ref(m, x, y, epoch, [o[1][-1] for o in outs], z))
        return out
    if name == "kd":
        zs = m.student(x)
        with torch.no_grad():
            zt = m.teacher(x)
        return {"student/ce": 0.1 * ref_ce(zs, y), "student/kl": 0.9 * ref_kl(zs, zt, 3.0)}
    if name in ("one", "one_sl"):
        out, maps, z = one_ref(m, x, y, epoch)
        if name == "one_sl":
            out.update(sl_ref(m, x, y, epoch, maps, z))
        return out
    if name in ("cl_ilr", "individual"):
        nb = m.net.num_branches
        _, _, z = branch_outputs(m, x, 1 / nb if name == "cl_ilr" else 1.0)
        out = {f"branch{i}/ce": ref_ce(zi, y) for i, zi in enumerate(z)}
        if name == "cl_ilr":
            for i, zi in enumerate(z):
                target = sum(zj for j, zj in enumerate(z) if j != i) / (nb - 1)
                out[f"branch{i}/kl"] = w * ref_kl(zi, target, 3.0, 1e-7)
        return out
    if name == "okddip":
        _, maps, z = branch_outputs(m, x)
        feats = [f.mean((2, 3)) for f in maps]
        wq, wk = m.attention.query.weight, m.attention.key.weight
        out = {}
        for a in range(3):
            rows = []
            for b in range(x.shape[0]):  # per sample, written out
                e = torch.stack([(wq @ feats[a][b]) @ (wk @ feats[c][b]) for c in range(3)])
                alpha = torch.softmax(e, 0)
                rows.append(sum(alpha[c] * z[c][b] for c in range(3)))
            out[f"peer{a}/ce"] = ref_ce(z[a], y)
            out[f"peer{a}/kl"] = w * ref_kl(z[a], torch.stack(rows), 3.0, 1e-7)
        out["leader/ce"] = ref_ce(z[3], y)
        out["leader/kl"] = w * ref_kl(z[3], (z[0] + z[1] + z[2]) / 3, 3.0, 1e-7)
        return out
    if name == "ffl":
        _, maps, z = branch_outputs(m, x)
        z_f, _ = fusion_ref(m.fusion, torch.cat(maps, 1))
        out = {f"branch{i}/ce": ref_ce(zi, y) for i, zi in enumerate(z)}
        out.update({f"branch{i}/kl": w * ref_kl(zi, z_f.detach(), 3.0, 1e-7) for i, zi in enumerate(z)})
        out["fusion/ce"] = ref_ce(z_f, y)
        out["fusion/kl"] = w * ref_kl(z_f, ((z[0] + z[1]) / 2).detach(), 3.0, 1e-7)
        return out
    raise AssertionError(name)


@pytest.mark.parametrize("epoch", [2, 40])
@pytest.mark.parametrize("name", PEER_METHODS)
def test_losses_and_gradients_match_the_reference(name, epoch, teacher_file):
    """Same weights, same inputs: every loss term and every parameter gradient equals the reference's."""
    extra = {"teacher_model": "resnet20", "teacher_checkpoint": str(teacher_file)} if name == "kd" else {}
    m = make(name, **extra)
    m.train()
    x, y = batch()
    losses = m.training_step(x, y, epoch)
    summed(losses).backward()
    got = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad(set_to_none=True)
    ref = reference_losses(name, m, x, y, epoch)
    assert set(ref) == {k for k in losses if not k.startswith("stat/")}
    for key, value in ref.items():
        close(losses[key], value)
    sum(ref.values()).backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert (got[n] is None) == (p.grad is None), n
            if p.grad is not None:
                torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------------------ gradient flow
def test_dml_detached_targets_give_no_gradient_to_peers():
    x, y = batch()
    m = make("dml")
    summed(m.training_step(x, y, 0), lambda k: k.startswith("net0/")).backward()
    assert some_grad_in(m.nets[0]) and no_grad_in(m.nets[1])
    m = make("dml", detach_targets=False)
    summed(m.training_step(x, y, 0), lambda k: k.startswith("net0/")).backward()
    assert some_grad_in(m.nets[1])


def test_dml_summed_backward_equals_per_net_backward():
    x, y = batch()
    m = make("dml", num_nets=3)
    losses = m.training_step(x, y, 0)
    summed(losses).backward(retain_graph=True)
    joint = [grads_of(net) for net in m.nets]
    for i, net in enumerate(m.nets):
        m.zero_grad(set_to_none=True)
        summed(losses, lambda k, i=i: k.startswith(f"net{i}/")).backward(retain_graph=True)
        for a, b in zip(joint[i], grads_of(net), strict=True):
            close(a, b)


def test_one_gate_learns_from_the_kl_only_when_not_detached():
    x, y = batch()
    for detach, expect in ((False, True), (True, False)):
        m = make("one", detach_teacher=detach)
        losses = m.training_step(x, y, 80)
        summed(losses, lambda k: k.endswith("/kl")).backward(retain_graph=True)
        assert some_grad_in(m.gate) is expect
        # through the non-detached teacher, branch 1's KL also reaches branch 0
        m.zero_grad(set_to_none=True)
        losses["branch1/kl"].backward(retain_graph=True)
        assert some_grad_in(m.net.branches[0]) is expect
        m.zero_grad(set_to_none=True)
        losses["teacher/ce"].backward()
        assert some_grad_in(m.gate)


def test_cl_ilr_trunk_gradient_is_exactly_one_mth():
    x, y = batch()
    grads = {}
    for rescale in (True, False):
        m = make("cl_ilr", seed=3, grad_rescale=rescale)
        summed(m.training_step(x, y, 80)).backward()
        grads[rescale] = (grads_of(m.net.shared), grads_of(m.net.branches))
    for scaled, plain in zip(grads[True][0], grads[False][0], strict=True):
        assert torch.equal(scaled * 4, plain)
    for scaled, plain in zip(grads[True][1], grads[False][1], strict=True):
        assert torch.equal(scaled, plain)


def test_cl_ilr_targets_detach_switch():
    x, y = batch()
    for detach, expect in ((False, True), (True, False)):
        m = make("cl_ilr", detach_targets=detach)
        summed(m.training_step(x, y, 80), lambda k: k == "branch0/kl").backward()
        assert some_grad_in(m.net.branches[1]) is expect


def test_okddip_projections_receive_gradient_unless_peer_targets_are_detached():
    x, y = batch()
    m = make("okddip")
    summed(m.training_step(x, y, 80)).backward()
    assert m.attention.query.weight.grad.abs().sum() > 0 and m.attention.key.weight.grad.abs().sum() > 0
    m = make("okddip", detach_peer_targets=True)
    summed(m.training_step(x, y, 80)).backward()
    assert no_grad_in(m.attention)


def test_okddip_leader_target_detach_switch():
    x, y = batch()
    for detach, expect in ((False, True), (True, False)):
        m = make("okddip", detach_leader_target=detach)
        m.training_step(x, y, 80)["leader/kl"].backward()
        assert some_grad_in(m.net.branches[0]) is expect
        assert some_grad_in(m.net.branches[3])


def test_ffl_fusion_loss_reaches_the_branches_unless_detached():
    x, y = batch()
    for detach, expect in ((False, True), (True, False)):
        m = make("ffl", detach_fusion_input=detach)
        losses = m.training_step(x, y, 80)
        losses["fusion/ce"].backward(retain_graph=True)
        assert some_grad_in(m.net.branches[0]) is expect and some_grad_in(m.net.shared) is expect
        assert some_grad_in(m.fusion)
        m.zero_grad(set_to_none=True)
        summed(losses, lambda k: k.startswith("branch")).backward()
        assert no_grad_in(m.fusion)  # z_f is a detached target of the branch KLs


@pytest.mark.parametrize("name", ["dml_sl", "one_sl"])
def test_leader_strategy_does_not_touch_the_peers(name):
    x, y = batch()
    m = make(name)
    losses = m.training_step(x, y, 10)
    summed(losses, lambda k: k.split("/")[0] in ("leader", "fusion")).backward(retain_graph=True)
    peers = m.nets if name == "dml_sl" else nn.ModuleList([m.net, m.gate])
    assert no_grad_in(peers) and some_grad_in(m.sl.leader) and some_grad_in(m.sl.fusion)
    m.zero_grad(set_to_none=True)
    summed(losses, lambda k: k.startswith("leader/")).backward(retain_graph=True)
    assert no_grad_in(m.sl.fusion)  # z_F and Phi are detached targets
    m.zero_grad(set_to_none=True)
    summed(losses, lambda k: k.startswith("fusion/")).backward()
    assert no_grad_in(m.sl.leader)


def test_kd_teacher_is_frozen_in_eval_mode(teacher_file):
    x, y = batch()
    m = make("kd", teacher_model="resnet20", teacher_checkpoint=str(teacher_file))
    m.train()
    assert m.student.training and not m.teacher.training
    before = m.teacher.bn1.running_mean.clone()
    summed(m.training_step(x, y, 0)).backward()
    assert torch.equal(before, m.teacher.bn1.running_mean)
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert [g.name for g in m.param_groups()] == ["student"]


# -------------------------------------------------------------------------------- KD teacher checkpoints
def test_kd_teacher_checkpoint_formats(teacher_file, tmp_path):
    state = torch.load(teacher_file, weights_only=True)
    deploy = {"format": "okd-deploy-v1", "model": "resnet20", "num_classes": K, "state_dict": state}
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    for i, obj in enumerate((deploy, wrapped)):
        torch.save(obj, tmp_path / f"{i}.pt")
        m = make("kd", teacher_model="resnet20", teacher_checkpoint=str(tmp_path / f"{i}.pt"))
        loaded = m.teacher.state_dict()
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())  # every tensor, BN buffers included
        assert not m.teacher.training and not any(p.requires_grad for p in m.teacher.parameters())


def test_kd_teacher_mismatch_is_a_clear_error(teacher_file, tmp_path):
    with pytest.raises(CheckpointError, match="does not match method.teacher_model=resnet32"):
        make("kd", teacher_model="resnet32", teacher_checkpoint=str(teacher_file))
    torch.save({"format": "okd-deploy-v1", "model": "resnet56", "state_dict": {}}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="holds a resnet56"):
        make("kd", teacher_model="resnet20", teacher_checkpoint=str(tmp_path / "d.pt"))
    with pytest.raises(CheckpointError, match="does not exist"):
        make("kd", teacher_model="resnet20", teacher_checkpoint=str(tmp_path / "none.pt"))
    torch.save({"format": "okd-run-v1", "method": {}}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="deploy.pt"):
        make("kd", teacher_model="resnet20", teacher_checkpoint=str(tmp_path / "last.pt"))
    state = torch.load(teacher_file, weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(100, 64), torch.zeros(100)
    torch.save(state, tmp_path / "k100.pt")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        make("kd", teacher_model="resnet20", teacher_checkpoint=str(tmp_path / "k100.pt"))


# ---------------------------------------------------------------------------------- config validation
def test_okddip_without_self_attention_needs_three_branches():
    build_config({"method": {"name": "okddip", "num_branches": 3, "self_attention": False}})
    build_config({"method": {"name": "okddip", "num_branches": 2}})  # with self-attention two suffice
    assert make("okddip", num_branches=3, self_attention=False).attention.self_attention is False


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("dml", {"num_nets": 1}),
        ("dml", {"target": "mean"}),
        ("dml", {"temperature": 0}),
        ("dml", {"deploy_net": 2}),
        ("kd", {"teacher_model": "", "teacher_checkpoint": "x.pt"}),
        ("kd", {"teacher_model": "resnet20", "teacher_checkpoint": ""}),
        ("kd", {"teacher_model": "nope", "teacher_checkpoint": "x.pt"}),
        ("kd", {"teacher_model": "resnet20", "teacher_checkpoint": "x.pt", "form": "x"}),
        ("kd", {"teacher_model": "resnet20", "teacher_checkpoint": "x.pt", "alpha": 1.5}),
        ("one", {"num_branches": 1}),
        ("one", {"kl_weight": -1}),
        ("one", {"rampup_length": -1}),
        ("one", {"deploy_branch": 4}),
        ("one", {"dropout": 1.0}),
        ("cl_ilr", {"target": "probs"}),
        ("individual", {"num_branches": 0}),
        ("okddip", {"proj_ratio": 0}),
        ("okddip", {"num_branches": 2, "self_attention": False}),
        ("ffl", {"fusion_weight_decay": -1e-5}),
        ("ffl", {"target_eps": -1}),
        ("dml_sl", {"sl_temperature": 0}),
        ("one_sl", {"fusion_weight": -1}),
    ],
)
def test_bad_values_fail_at_config_time(name, bad):
    with pytest.raises(ConfigError) as err:
        build_config({"method": {"name": name, **bad}})
    message = str(err.value)  # it names the offending key (or quotes the unknown value)
    assert any(f"method.{k}" in message or f"{v!r}" in message for k, v in bad.items()), message


def test_registered_with_description_and_paper():
    for name in PEER_METHODS:
        info = METHODS.info(name)
        assert info["description"] and info["paper"], name


def test_every_resnet32_config_loads():
    for name in PEER_METHODS:
        cfg = load_config(f"cifar100/{name}_resnet32")
        assert cfg.method_name == name and cfg.run.model.name == "resnet32"


# -------------------------------------------------------------------- heads and the deployable network
DEPLOY = {"dml": "net0", "kd": "student", "one": "branch0", "cl_ilr": "branch0", "individual": "branch0",
          "okddip": "leader", "ffl": "branch0", "dml_sl": "leader", "one_sl": "leader"}  # fmt: skip


@pytest.mark.parametrize("name", PEER_METHODS)
def test_deployable_is_the_plain_backbone_and_scores_the_deploy_head(name, teacher_file):
    extra = {"teacher_model": "resnet20", "teacher_checkpoint": str(teacher_file)} if name == "kd" else {}
    m = make(name, **extra).eval()
    x, _ = batch()
    with torch.no_grad():
        heads = m.eval_outputs(x)
        net = m.deployable()
        assert m.deploy_head == DEPLOY[name] and m.deploy_head in heads
        close(net(x), heads[m.deploy_head])
    plain = create_model("resnet20", K)
    plain.load_state_dict(net.state_dict())
    assert all(z.shape == (4, K) for z in heads.values())
    for group in m.oracle_groups().values():
        assert set(group) <= set(heads)


def test_heads_of_each_method():
    x, _ = batch()
    with torch.no_grad():
        assert set(make("one").eval().eval_outputs(x)) == {
            "branch0", "branch1", "branch2", "branch3", "mean_logits", "ensemble", "gated"}  # fmt: skip
        assert set(make("okddip").eval().eval_outputs(x)) == {
            "peer0", "peer1", "peer2", "leader", "peer_mean_logits", "peer_ensemble"}  # fmt: skip
        assert set(make("ffl").eval().eval_outputs(x)) == {"branch0", "branch1", "mean_logits", "ensemble", "fusion"}
        assert set(make("dml_sl").eval().eval_outputs(x)) == {
            "net0", "net1", "mean_logits", "ensemble", "fusion", "leader"}  # fmt: skip


def test_param_groups_and_fusion_weight_decay():
    groups = {g.name: g for g in make("ffl").param_groups()}
    assert set(groups) == {"net", "fusion"} and groups["fusion"].weight_decay == 1e-5
    assert groups["net"].weight_decay == OptimConfig().weight_decay
    m = make("one_sl")
    groups = {g.name: g for g in m.param_groups()}
    assert set(groups) == {"net", "leader", "fusion"} and groups["fusion"].weight_decay == 1e-5
    ids = [id(p) for g in groups.values() for p in g.params]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert [g.name for g in make("dml", num_nets=3).param_groups()] == ["net0", "net1", "net2"]


# ------------------------------------------------------------------------------------------ golden values
GOLDEN: dict[str, dict[str, float]] = {
    "dml": {
        "net0/ce": 2.540765,
        "net0/kl": 0.5138,
        "net1/ce": 2.142496,
        "net1/kl": 0.486739,
    },
    "kd": {
        "student/ce": 0.254076,
        "student/kl": 2.986692,
    },
    "one": {
        "branch0/ce": 2.540765,
        "branch0/kl": 0.051082,
        "branch1/ce": 2.274092,
        "branch1/kl": 0.054489,
        "branch2/ce": 2.202138,
        "branch2/kl": 0.048462,
        "branch3/ce": 2.631725,
        "branch3/kl": 0.020946,
        "teacher/ce": 2.23072,
        "stat/kl_weight": 0.286505,
    },
    "cl_ilr": {
        "branch0/ce": 2.540765,
        "branch0/kl": 0.086794,
        "branch1/ce": 2.274092,
        "branch1/kl": 0.084923,
        "branch2/ce": 2.202138,
        "branch2/kl": 0.084336,
        "branch3/ce": 2.631725,
        "branch3/kl": 0.036741,
        "stat/kl_weight": 0.286505,
    },
    "individual": {
        "branch0/ce": 2.540765,
        "branch1/ce": 2.274092,
        "branch2/ce": 2.202138,
        "branch3/ce": 2.631725,
    },
    "okddip": {
        "peer0/ce": 2.540765,
        "peer0/kl": 0.059598,
        "peer1/ce": 2.274092,
        "peer1/kl": 0.042457,
        "peer2/ce": 2.202138,
        "peer2/kl": 0.038401,
        "leader/ce": 2.631725,
        "leader/kl": 0.036741,
        "stat/kl_weight": 0.286505,
        "stat/peer_diversity": 0.321004,
    },
    "ffl": {
        "branch0/ce": 2.540765,
        "branch0/kl": 0.0638,
        "branch1/ce": 2.274092,
        "branch1/kl": 0.048218,
        "fusion/ce": 2.302648,
        "fusion/kl": 0.018847,
        "stat/kl_weight": 0.286505,
    },
    "dml_sl": {
        "net0/ce": 2.540765,
        "net0/kl": 0.5138,
        "net1/ce": 2.142496,
        "net1/kl": 0.486739,
        "fusion/ce": 2.272664,
        "fusion/kl": 0.049576,
        "leader/ce": 2.196476,
        "leader/kl": 0.296782,
        "leader/fused_map": 0.082032,
        "leader/decoder": 0.083289,
        "stat/fusion_weight": 10.0,
    },
    "one_sl": {
        "branch0/ce": 2.540765,
        "branch0/kl": 0.051082,
        "branch1/ce": 2.274092,
        "branch1/kl": 0.054489,
        "branch2/ce": 2.202138,
        "branch2/kl": 0.048462,
        "branch3/ce": 2.631725,
        "branch3/kl": 0.020946,
        "teacher/ce": 2.23072,
        "stat/kl_weight": 0.286505,
        "fusion/ce": 2.348242,
        "fusion/kl": 0.037582,
        "leader/ce": 1.649789,
        "leader/kl": 0.249254,
        "leader/fused_map": 0.106364,
        "leader/decoder": 0.073627,
        "stat/fusion_weight": 10.0,
    },
}


@pytest.mark.parametrize("name", PEER_METHODS)
def test_golden_loss_values(name, teacher_file):
    extra = {"teacher_model": "resnet20", "teacher_checkpoint": str(teacher_file)} if name == "kd" else {}
    m = make(name, seed=11, **extra)
    m.train()
    x, y = batch(seed=12)
    losses = {k: float(v.detach()) for k, v in m.training_step(x, y, 40).items()}
    assert losses == pytest.approx(GOLDEN[name], rel=1e-4, abs=1e-6)


def test_rampup_reference():
    assert rampup_0based(0) == pytest.approx(math.exp(-5)) and rampup_0based(80) == 1.0
    assert rampup_0based(40) == pytest.approx(math.exp(-5 * 0.5**2))  # mid-ramp: the default length is 80
    assert rampup_0based(60) == pytest.approx(math.exp(-5 * 0.25**2)) and rampup_0based(79) < 1.0


# ---------------------------------------------------------------------------- end to end through the trainer
def e2e_overrides(root: Path, out: Path, name: str, method: str, teacher: Path, epochs: int) -> list[str]:
    settings = {
        "data.dataset": "cifar10",
        "data.limit_train": 32,
        "data.limit_test": 20,
        "data.batch_size": 8,
        "data.test_batch_size": 20,
        "model.name": "resnet20",
        "train.max_steps_per_epoch": 2,
        "seed": 3,
    }
    if method == "kd":
        settings.update({"method.teacher_model": "resnet20", "method.teacher_checkpoint": teacher})
    return helpers.quick_overrides(root, out, name, epochs, settings)


@pytest.mark.slow
@pytest.mark.parametrize("name", PEER_METHODS)
def test_trains_evaluates_every_head_and_resumes_exactly(name, cifar10_root, teacher_file, tmp_path):
    from okd.engine.trainer import train
    from okd.io import load_checkpoint
    from okd.runs.metrics import read_metrics_csv

    config = f"cifar100/{name}_resnet32"

    def cfg(run: str, epochs: int):
        return load_config(config, e2e_overrides(cifar10_root, tmp_path, run, name, teacher_file, epochs))

    straight = train(cfg("straight", 2))
    rows = read_metrics_csv(straight / "metrics.csv")
    method = make(
        name, **({"teacher_model": "resnet20", "teacher_checkpoint": str(teacher_file)} if name == "kd" else {})
    )
    heads = set(method.eval().eval_outputs(batch()[0])) | set(method.oracle_groups())
    heads |= {
        k.split("/")[0] for k in method.derived_metrics({f"{h}/{t}": 1.0 for h in heads for t in ("top1", "top5")})
    }
    assert {k.split("/")[1] for k in rows[-1] if k.startswith("test/") and k.endswith("/top1")} == heads
    assert all(math.isfinite(rows[-1][k]) for k in rows[-1] if k.startswith("train/"))
    deploy = load_checkpoint(straight / "deploy.pt")
    create_model(deploy["model"], deploy["num_classes"]).load_state_dict(deploy["state_dict"])
    assert load_checkpoint(straight / "best.pt")["best"]["head"] == method.deploy_head

    split = train(cfg("split", 1))
    split = train(cfg("split", 2), run_dir=split, resume=True)
    helpers.assert_same_runs(straight, split)


def test_average_accuracy_metrics():
    metrics = {"net0/top1": 50.0, "net0/top5": 80.0, "net1/top1": 60.0, "net1/top5": 90.0}
    assert make("dml").derived_metrics(metrics) == {"net_avg/top1": 55.0, "net_avg/top5": 85.0}
    peers = {f"peer{a}/top1": 10.0 * a for a in range(3)} | {"leader/top1": 99.0}
    assert make("okddip").derived_metrics(peers) == {"peer_avg/top1": 10.0}
    assert make("individual", num_branches=2).derived_metrics({"branch0/top1": 1.0}) == {}  # incomplete: none
