"""PCL (``docs/methods.md``, ``pcl``): losses against their equations, gradient flow, the mean-teacher update, the
heads and the deployable network, golden values (training end to end with exact resume: ``test_shared.py``)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from method_helpers import B, K, ce_manual, kl_manual
from method_helpers import views_batch as batch

from okd.config import OptimConfig
from okd.engine.builder import build_optimization
from okd.errors import ConfigError
from okd.methods.base import Method, MethodContext
from okd.methods.build import load_config
from okd.methods.pcl import PCL, PCLParams, ema_alpha, ema_update, pcl_losses, pcl_rampup
from okd.models import create_model


def make_pcl(model: str = "resnet20", num_classes: int = K, seed: int = 0, **params) -> PCL:
    torch.manual_seed(seed)
    return PCL(MethodContext(model, num_classes, OptimConfig(), PCLParams(**params), 300))


def test_pcl_rampup_correct_and_bug():
    assert pcl_rampup(0) == pytest.approx(math.exp(-5))
    assert pcl_rampup(40) == pytest.approx(math.exp(-5 * 0.25))
    assert pcl_rampup(80) == 1.0 and pcl_rampup(200) == 1.0
    bug = [pcl_rampup(e, 80, divides_by_lambda_bug=True) for e in (0, 1, 2, 3, 50, 80, 81, 299)]
    assert bug[:4] == pytest.approx([math.exp(-5), 1.0, math.exp(-5), math.exp(-20)])
    assert bug[4] < 1e-300 and bug[5] < 1e-300  # ~0 from epoch 3 to 80
    assert bug[6:] == [1.0, 1.0]


def test_ema_alpha_schedule():
    assert ema_alpha(0) == 0.0  # t = 0: the EMA becomes the model
    assert ema_alpha(1) == 0.5 and ema_alpha(9) == pytest.approx(0.9)
    assert ema_alpha(998) < 0.999 and ema_alpha(999) == pytest.approx(0.999) and ema_alpha(10_000) == 0.999
    assert ema_alpha(10, cap=0.5) == 0.5


def test_ema_update_arithmetic():
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])
    ema_update([a], [b], 0.25)
    assert torch.allclose(a, torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * -2 + 0.75 * 4]))


def test_ema_update_keeps_the_mean_teacher_out_of_autograd():
    """Blending in the student's trained parameters records nothing: the EMA weights stay graph-free leaves (else
    each step's graph would chain onto the last one's for the whole run)."""
    ema = torch.nn.Parameter(torch.tensor([1.0, -2.0]), requires_grad=False)
    student = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    ema_update([ema], [student], 0.5)
    assert not ema.requires_grad and ema.grad_fn is None and ema.is_leaf


def test_pcl_losses_match_the_equation():
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(B, K, generator=g) * 2 for _ in range(3)]
    peer = torch.randn(B, K, generator=g) * 2
    ema = [torch.randn(B, K, generator=g) * 2 for _ in range(3)]
    y = torch.tensor([1, 0, 9, 4])
    for epoch, bug in ((0, False), (40, False), (1, True), (5, True)):
        hp = PCLParams(rampup_divides_by_lambda_bug=bug)
        losses = pcl_losses(logits, peer, ema, y, hp, epoch)
        w = pcl_rampup(epoch, 80, bug)
        assert losses["stat/kl_weight"].item() == pytest.approx(w)
        assert losses["peer_ensemble/ce"].item() == pytest.approx(ce_manual(peer, y).item(), rel=1e-5)
        total = ce_manual(peer, y)
        for i in range(3):
            kl_pe = kl_manual(logits[i], peer, 3.0)
            kl_mt = 0.5 * sum(kl_manual(logits[i], ema[j], 3.0) for j in range(3) if j != i)
            assert losses[f"branch{i}/ce"].item() == pytest.approx(ce_manual(logits[i], y).item(), rel=1e-5)
            assert losses[f"branch{i}/kl_peer"].item() == pytest.approx(w * kl_pe.item(), rel=1e-5, abs=1e-12)
            assert losses[f"branch{i}/kl_mean_teacher"].item() == pytest.approx(w * kl_mt.item(), rel=1e-5, abs=1e-12)
            total = total + ce_manual(logits[i], y) + w * (kl_pe + kl_mt)
        summed = sum(v for k, v in losses.items() if not k.startswith("stat/"))
        assert summed.item() == pytest.approx(total.item(), rel=1e-5)


def test_pcl_golden_loss_values():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(B, K, generator=g) for _ in range(3)]
    peer, ema = torch.randn(B, K, generator=g), [torch.randn(B, K, generator=g) for _ in range(3)]
    losses = pcl_losses(logits, peer, ema, torch.tensor([0, 3, 7, 3]), PCLParams(), 40)
    got = {k: round(v.item(), 5) for k, v in losses.items()}
    assert got == pytest.approx(GOLDEN_PCL_LOSSES, abs=2e-5)
    method = make_pcl()
    views, y = batch(3)
    got = {k: v.item() for k, v in method.training_step(views, y, 40).items()}
    assert got == pytest.approx(GOLDEN_PCL_STEP, rel=1e-4)


def test_pcl_each_branch_sees_its_own_view():
    method = make_pcl()
    method.eval()  # BN with running statistics: a sample's output does not depend on the batch
    views, _ = batch(3)
    with torch.no_grad():
        base, _ = method.student.forward_views(views)
        changed, _ = method.student.forward_views([views[0], views[1], torch.randn_like(views[2])])
    assert torch.equal(base[0], changed[0]) and torch.equal(base[1], changed[1])
    assert not torch.allclose(base[2], changed[2])
    with pytest.raises(ValueError, match="3 independently augmented views"):
        method.training_step(views[0], torch.zeros(B, dtype=torch.long), 0)
    assert PCL.views == 3 and PCL.views_for(PCLParams(num_branches=4)) == 4


def test_pcl_gradient_flow():
    method = make_pcl()
    views, y = batch(3)
    losses = method.training_step(views, y, 100)
    losses["peer_ensemble/ce"].backward(retain_graph=True)
    student = method.student
    assert student.peer_fc.weight.grad.abs().sum() > 0
    for i in range(3):  # the peer-ensemble CE reaches every branch and the trunk
        assert student.net.branches[i]["layer3"][0].conv1.weight.grad.abs().sum() > 0
    assert student.net.shared["conv1"].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in method.ema.parameters())
    method.zero_grad(set_to_none=True)
    kl = sum(v for k, v in losses.items() if "/kl_" in k)
    kl.backward()
    assert student.peer_fc.weight.grad is None  # the peer-ensemble target is detached
    assert student.net.branches[1]["fc"].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.ema.parameters())


def assert_ema_step_blends(method: PCL, shift: float, alpha: float) -> None:
    """Shift the student by ``shift``, take one mean-teacher step, check ema = alpha*ema + (1-alpha)*student."""
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(shift)
    before = [q.clone() for q in method.ema.parameters()]
    method.after_optimizer_step()
    for p, q, q0 in zip(method.student.parameters(), method.ema.parameters(), before, strict=True):
        torch.testing.assert_close(q, alpha * q0 + (1 - alpha) * p, rtol=1e-5, atol=1e-6)


def test_pcl_mean_teacher_update_and_buffers():
    method = make_pcl()
    student, ema = method.student, method.ema
    assert not torch.equal(student.peer_fc.weight, ema.peer_fc.weight)  # independent init
    views, y = batch(3)
    method.training_step(views, y, 0)  # the EMA forward (train mode) updates its own BN buffers
    ema_rm = ema.net.shared["bn1"].running_mean.clone()
    method.after_optimizer_step()  # t = 0: copy
    for p, q in zip(student.parameters(), ema.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(ema.net.shared["bn1"].running_mean, ema_rm)  # buffers are not averaged
    assert not torch.equal(ema_rm, student.net.shared["bn1"].running_mean)
    assert_ema_step_blends(method, 1.0, 0.5)  # t = 1: alpha = 1/2
    assert int(method.ema_step) == 2
    # the step resumes from the state dict (a fresh method continues at t = 2, alpha = 2/3)
    other = make_pcl(seed=5)
    other.load_state_dict(method.state_dict())
    assert_ema_step_blends(other, 3.0, 2 / 3)
    assert int(other.ema_step) == 3


def test_pcl_groups_heads_deploy_and_counts():
    method = make_pcl()
    groups = method.param_groups()
    assert [g.name for g in groups] == ["net"]
    assert {id(p) for p in groups[0].params} == {id(p) for p in method.student.parameters()}
    heads = method.eval().eval_outputs(torch.randn(2, 3, 32, 32))
    expected = {f"branch{i}" for i in range(3)} | {f"ema_branch{i}" for i in range(3)}
    expected |= {"peer_ensemble", "mean_logits", "ensemble", "ema_mean_logits", "ema_ensemble"}
    assert set(heads) == expected and method.deploy_head == "ema_branch0"
    net = method.deployable()  # the mean-teacher trunk + mean-teacher branch 1, as a plain backbone
    plain = create_model("resnet20", K)
    plain.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), method.ema.net(x)[0])
    # models.md §11: PCL ResNet-32 (3 branches + ensemble FC 192 -> 100) has 1,212,384 parameters
    big = make_pcl("resnet32", 100)
    assert sum(p.numel() for p in big.student.parameters()) == 1_212_384
    assert sum(p.numel() for p in big.ema.parameters()) == 1_212_384


def test_pcl_build_optimization_accepts_the_frozen_ema():
    cfg = load_config(None, ["method.name=pcl", "model.name=resnet20"])
    method = PCL(MethodContext("resnet20", K, cfg.run.optim, cfg.method_params, 300))
    plan = build_optimization(method, cfg)
    optimized = [id(p) for opt in plan.optimizers for group in opt.param_groups for p in group["params"]]
    assert plan.names == ["net"] and len(optimized) == len(set(optimized))  # every parameter once
    assert set(optimized) == {id(p) for p in method.student.parameters()}  # all of the student's
    assert not set(optimized) & {id(p) for p in method.ema.parameters()}  # none of the mean teacher's


def test_pcl_mean_teacher_decay_is_capped_at_0_999_by_default():
    """After 1,500 steps 1 - 1/(t+1) > 0.999, so the default cap alone sets alpha (0.99 would be 10x faster)."""
    method = make_pcl()
    method.ema_step.fill_(1500)
    method.load_state_dict(method.state_dict())  # a resumed run: the step comes from the buffer
    assert_ema_step_blends(method, 1.0, 0.999)
    assert int(method.ema_step) == 1501


def test_pcl_best_of_branches_metric():
    method = make_pcl(deploy_best_of_branches=True)
    metrics = {"ema_branch0/top1": 50.0, "ema_branch1/top1": 61.0, "ema_branch2/top1": 55.0, "ema_branch1/top5": 90.0}
    assert method.derived_metrics(metrics) == {"ema_best_of_3/top1": 61.0, "ema_best_of_3/top5": 90.0}
    assert int(method.best_branch) == 1 and method.deploy_head == "ema_best_of_3"
    assert method.deployable() is method.ema.net.single_branch(1)
    if not hasattr(Method, "derived_metrics"):  # the trainer hook is not there yet: the option is refused
        with pytest.raises(ConfigError, match="derived_metrics"):
            load_config(None, ["method.name=pcl", "method.deploy_best_of_branches=true"])


def test_pcl_best_of_branches_can_pick_every_branch_the_last_included():
    """Each EMA branch, the last one too, is picked (and deployed) when it scores best; ties go to the first."""
    method = make_pcl(deploy_best_of_branches=True)
    for best in range(3):
        metrics = {f"ema_branch{i}/top1": 70.0 if i == best else 40.0 + i for i in range(3)}
        metrics |= {f"ema_branch{i}/top5": 90.0 + i for i in range(3)}
        assert method.derived_metrics(metrics) == {"ema_best_of_3/top1": 70.0, "ema_best_of_3/top5": 90.0 + best}
        assert int(method.best_branch) == best
    method.derived_metrics({f"ema_branch{i}/top1": 50.0 for i in range(3)})
    assert int(method.best_branch) == 0


def test_pcl_oracles_cover_every_branch():
    assert make_pcl(num_branches=4).oracle_groups() == {
        "oracle_any_branch": ["branch0", "branch1", "branch2", "branch3"],
        "oracle_any_ema_branch": ["ema_branch0", "ema_branch1", "ema_branch2", "ema_branch3"],
    }


def test_pcl_params_validation():
    for bad in ("method.deploy_branch=3", "method.num_branches=1", "method.ema_decay=1.0", "method.temperature=0"):
        with pytest.raises(ConfigError, match=re.escape(bad.split("=")[0])):
            load_config(None, ["method.name=pcl", bad])


def test_pcl_copy_branch0_classifier_init():
    method = make_pcl(copy_branch0_classifier_init=True)
    fcs = [b["fc"].weight for b in method.student.net.branches]
    assert torch.equal(fcs[0], fcs[1]) and torch.equal(fcs[0], fcs[2])
    convs = [b["layer3"][0].conv1.weight for b in method.student.net.branches]
    assert not torch.equal(convs[0], convs[1])
    assert not torch.equal(*[b["fc"].weight for b in make_pcl().student.net.branches[:2]])


# Golden values (CPU, float32): recomputed on fixed inputs; a silent change in the numerics fails here.
GOLDEN_PCL_LOSSES = {
    "peer_ensemble/ce": 1.95764,
    "branch0/ce": 2.50106,
    "branch0/kl_peer": 0.23977,
    "branch0/kl_mean_teacher": 0.37394,
    "branch1/ce": 2.61741,
    "branch1/kl_peer": 0.25164,
    "branch1/kl_mean_teacher": 0.36201,
    "branch2/ce": 2.21206,
    "branch2/kl_peer": 0.2444,
    "branch2/kl_mean_teacher": 0.22202,
    "stat/kl_weight": 0.2865,
}


GOLDEN_PCL_STEP = {
    "peer_ensemble/ce": 2.48402,
    "branch0/ce": 2.43214,
    "branch0/kl_peer": 0.0292535,
    "branch0/kl_mean_teacher": 0.0747863,
    "branch1/ce": 1.94113,
    "branch1/kl_peer": 0.122794,
    "branch1/kl_mean_teacher": 0.0621875,
    "branch2/ce": 2.38999,
    "branch2/kl_peer": 0.0715566,
    "branch2/kl_mean_teacher": 0.0608477,
    "stat/kl_weight": 0.286505,
}
