"""PCL and KDCL (``methods.md`` §7, §8): losses against their equations, gradient flow, the mean-teacher update,
the ensembling rules, golden values, and training end to end with exact resume."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import helpers
import pytest
import torch
import torch.nn.functional as F

import okd.methods.kdcl  # noqa: F401  (registers "kdcl")
import okd.methods.pcl  # noqa: F401  (registers "pcl")
from okd.config import OptimConfig
from okd.engine.builder import build_optimization
from okd.engine.trainer import train
from okd.errors import ConfigError
from okd.io import load_checkpoint
from okd.methods.base import Method, MethodContext
from okd.methods.build import load_config
from okd.methods.kdcl import (
    KDCL,
    KDCLParams,
    combined_ce,
    fit_linear_weights,
    general_weights,
    kdcl_losses,
    kdcl_target,
    min_logit_target,
    project_simplex,
)
from okd.methods.pcl import PCL, PCLParams, ema_alpha, ema_update, pcl_losses, pcl_rampup
from okd.models import create_model

B, K = 4, 10


def kl_manual(student: torch.Tensor, target: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 (1/B) sum_b sum_k q (log q - log p), written out."""
    q = torch.softmax(target / T, dim=1)
    return T * T * (q * (q.log() - torch.log_softmax(student / T, dim=1))).sum(dim=1).mean()


def ce_manual(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -(torch.log_softmax(z, dim=1).gather(1, y.view(-1, 1))).mean()


def make_pcl(model: str = "resnet20", num_classes: int = K, seed: int = 0, **params) -> PCL:
    torch.manual_seed(seed)
    return PCL(MethodContext(model, num_classes, OptimConfig(), PCLParams(**params), 300))


def make_kdcl(model: str = "resnet20", num_classes: int = K, seed: int = 0, **params) -> KDCL:
    torch.manual_seed(seed)
    return KDCL(MethodContext(model, num_classes, OptimConfig(), KDCLParams(**params), 240))


def batch(views: int, seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 32, 32, generator=g) for _ in range(views)], torch.tensor([0, 3, 7, 3])


# ----------------------------------------------------------------------------------------------------- PCL


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


# ---------------------------------------------------------------------------------------------------- KDCL


def test_min_logit_by_hand():
    z1 = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    z2 = torch.tensor([[1.0, -1.0, 1.0], [2.0, 0.0, 4.0]])
    y = torch.tensor([0, 2])
    # sample 0 (y=0): z1 - 2 = [0, -1, -2], z2 - 1 = [0, -2, 0] -> [0, -2, -2]
    # sample 1 (y=2): z1 - 1 = [-1, 2, 0], z2 - 4 = [-2, -4, 0] -> [-2, -4, 0]
    assert torch.equal(min_logit_target([z1, z2], y), torch.tensor([[0.0, -2.0, -2.0], [-2.0, -4.0, 0.0]]))


def test_project_simplex():
    v = torch.tensor([[0.5, 0.5], [2.0, 0.0], [0.2, 0.2], [0.9, 0.6]], dtype=torch.float64)
    expected = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.5, 0.5], [0.65, 0.35]], dtype=torch.float64)
    assert torch.allclose(project_simplex(v), expected)
    assert torch.allclose(project_simplex(torch.tensor([0.1, 0.1, 0.1])), torch.full((3,), 1 / 3))


def test_linear_rule_hand_solvable_cases():
    # symmetric: two samples whose true-class margins are 2w-1 and 1-2w -> w = 1/2
    z0, z1 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    y = torch.zeros(2, dtype=torch.long)
    assert torch.allclose(fit_linear_weights([z0, z1], y), torch.tensor([0.5, 0.5], dtype=torch.float64))
    # the first sample twice: 2 sigma(1 - 2w) = sigma(2w - 1) -> e^(2w-1) = 2 -> w = (1 + ln 2) / 2
    z0, z1 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[-1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    w = fit_linear_weights([z0, z1], torch.zeros(3, dtype=torch.long))
    assert w[0].item() == pytest.approx((1 + math.log(2)) / 2, abs=1e-9) and w.sum().item() == pytest.approx(1.0)
    # a perfect student and an anti-student: all weight on the first (a vertex of the simplex)
    w = fit_linear_weights([torch.tensor([[5.0, 0.0]]), torch.tensor([[-5.0, 0.0]])], torch.tensor([0]))
    assert torch.equal(w, torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_linear_rule_beats_a_simplex_grid():
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(16, 5, generator=g) * s for s in (4.0, 2.0, 1.0)]
    y = torch.randint(0, 5, (16,), generator=g)
    w = fit_linear_weights(zs, y)
    assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0)
    z = torch.stack(zs).double()
    steps = [i / 50 for i in range(51)]
    grid = torch.tensor([(a, b, 1 - a - b) for a, b in itertools.product(steps, steps) if a + b <= 1 + 1e-12])
    best_grid = combined_ce(grid.double().clamp_min(0), z, y).min()
    assert combined_ce(w.view(1, -1), z, y)[0] <= best_grid + 1e-12


def test_general_weights_by_hand():
    w = general_weights(torch.diag(torch.tensor([1.0, 2.0])), ridge=0.0)  # w ~ C^-1 1 = (1, 1/2)
    assert torch.allclose(w, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    c = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    assert torch.allclose(general_weights(c, ridge=0.0), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_kdcl_fit_on_holdout_estimates_the_error_covariance():
    method = make_kdcl()
    views, y = batch(1)
    w = method.fit_on_holdout([(views[0], y), (views[0][:2], y[:2])])
    x = torch.cat([views[0], views[0][:2]])
    yy = torch.cat([y, y[:2]])
    method.eval()
    with torch.no_grad():
        err = torch.stack([torch.softmax(s(x).double(), 1) for s in method.students]) - F.one_hot(yy, K)
    cov = torch.einsum("mbk,nbk->mn", err, err) / 6
    assert torch.allclose(w, general_weights(cov, 1e-6)) and torch.equal(method.general_weights, w)
    assert method.training is False  # left as it was
    target, weights = kdcl_target([torch.ones(B, K), torch.zeros(B, K)], y, KDCLParams(ensemble="general"), w)
    assert torch.allclose(target, torch.full((B, K), float(w[0])))


def test_kdcl_losses_match_the_equation():
    g = torch.Generator().manual_seed(4)
    logits = [torch.randn(B, K, generator=g) * 3 for _ in range(3)]
    y = torch.tensor([2, 2, 5, 9])
    hp = KDCLParams(num_students=3, alpha=0.3, temperature=2.0)
    for rule in ("naive", "min_logit", "linear"):
        hp.ensemble = rule
        target, weights = kdcl_target(logits, y, hp)
        if rule == "naive":
            assert torch.allclose(target, sum(logits) / 3) and weights is None
            hp.naive_target = "sum"  # an older revision of the re-implementation (not the spec's commit)
            assert torch.allclose(kdcl_target(logits, y, hp)[0], sum(logits))
            hp.naive_target = "mean"
        if rule == "linear":
            assert torch.allclose(target, sum(w * z for w, z in zip(weights.float(), logits, strict=True)), atol=1e-5)
        losses = kdcl_losses(logits, target, y, hp)
        for i, z in enumerate(logits):
            assert losses[f"student{i}/ce"].item() == pytest.approx(0.7 * ce_manual(z, y).item(), rel=1e-5)
            assert losses[f"student{i}/kl"].item() == pytest.approx(0.3 * kl_manual(z, target, 2.0).item(), rel=1e-5)


def test_kdcl_golden_loss_values():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(B, K, generator=g) * 2 for _ in range(2)]
    y = torch.tensor([0, 3, 7, 3])
    got = {}
    for rule in ("naive", "linear", "min_logit"):
        hp = KDCLParams(ensemble=rule)
        target, _ = kdcl_target(logits, y, hp)
        got.update({f"{rule}:{k}": round(v.item(), 5) for k, v in kdcl_losses(logits, target, y, hp).items()})
    assert got == pytest.approx(GOLDEN_KDCL_LOSSES, abs=2e-5)
    method = make_kdcl(models=["resnet20", "wrn16_2"], ensemble="linear")
    views, y = batch(2)
    got = {k: v.item() for k, v in method.training_step(views, y, 0).items()}
    assert got == pytest.approx(GOLDEN_KDCL_STEP, rel=1e-4)


@pytest.mark.parametrize("rule", ["naive", "linear", "min_logit"])
def test_kdcl_targets_are_detached(rule):
    method = make_kdcl(ensemble=rule)
    views, y = batch(2)
    losses = method.training_step(views, y, 0)
    losses["student0/kl"].backward()
    assert all(p.grad is None for p in method.students[1].parameters())
    assert method.students[0].fc.weight.grad.abs().sum() > 0


def test_kdcl_students_views_groups_and_deploy():
    method = make_kdcl(models=["resnet20", "wrn16_2"])
    assert [type(s).__name__ for s in method.students] == ["CifarResNet", "WideResNet"]
    assert [g.name for g in method.param_groups()] == ["student0", "student1"]
    assert method.deployable() is method.students[0] and method.deploy_head == "student0"
    wrn = make_kdcl(model="wrn16_2", models=["resnet20", "wrn16_2"])
    assert wrn.deployable() is wrn.students[1]
    with pytest.raises(ConfigError, match="model.name"):
        make_kdcl(model="resnet32", models=["resnet20", "wrn16_2"])
    with pytest.raises(ConfigError, match="model.name"):
        make_kdcl(models=["resnet20", "wrn16_2"], deploy_student=1)
    assert KDCL.views_for(KDCLParams(models=["a", "b", "c"])) == 3 and KDCL.views_for(KDCLParams()) == 2
    assert len(make_kdcl(num_students=3).students) == 3
    views, y = batch(2)
    # each student sees its own view
    method.eval()
    with torch.no_grad():
        heads = method.eval_outputs(views[1])
        assert torch.equal(heads["student1"], method.students[1](views[1]))
    assert set(heads) == {"student0", "student1", "mean_logits", "ensemble"}
    with pytest.raises(ValueError, match="2 independently augmented views"):
        method.training_step(views[:1], y, 0)


def test_kdcl_params_validation():
    bad = [
        "method.num_students=1",
        "method.models=[resnet20,nope]",
        "method.ensemble=max",
        "method.alpha=1.5",
        "method.models=[resnet20,resnet20] method.num_students=3",
    ]
    for item in bad:
        with pytest.raises(ConfigError, match=re.escape(item.split("=")[0])):
            load_config(None, ["method.name=kdcl", *item.split()])
    if not hasattr(Method, "fit_on_holdout"):
        with pytest.raises(ConfigError, match="held-out"):
            load_config(None, ["method.name=kdcl", "method.ensemble=general"])


# -------------------------------------------------------------------------------------------- end to end


def quick(root: Path, out: Path, name: str, method: list[str], epochs: int) -> list[str]:
    settings = {
        "data.dataset": "cifar10",
        "data.limit_train": 128,
        "data.limit_test": 64,
        "data.batch_size": 32,
        "data.test_batch_size": 64,
        "train.max_steps_per_epoch": 2,
        "train.device": "cpu",
        "optim.milestones": "[1]",
        "seed": 3,
    }
    return [*helpers.quick_overrides(root, out, name, epochs, settings), *method]


METHOD_RUNS = {
    "pcl": ["method.name=pcl", "model.name=resnet20"],
    "kdcl": ["method.name=kdcl", "model.name=resnet20", "method.models=[resnet20,wrn16_2]", "method.ensemble=linear"],
}


@pytest.mark.parametrize("name", sorted(METHOD_RUNS))
def test_trains_end_to_end_and_resumes_exactly(name, cifar10_root, tmp_path):
    full, resumed = helpers.train_and_resume(
        None, lambda run, epochs: quick(cifar10_root, tmp_path, run, METHOD_RUNS[name], epochs)
    )
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key in ("method", "optimizers", "schedulers"):
        helpers.assert_same(a[key], b[key], key)
    row = a["history"][-1]
    if name == "pcl":
        assert int(a["method"]["ema_step"]) == 4  # 2 epochs x 2 steps
        assert not torch.equal(a["method"]["ema.peer_fc.weight"], a["method"]["student.peer_fc.weight"])
        for key in (
            "train/peer_ensemble/ce",
            "train/branch2/kl_mean_teacher",
            "test/ema_branch0/top1",
            "test/peer_ensemble/top1",
            "test/oracle_any_ema_branch/top1",
        ):
            assert key in row, key
        assert a["best"]["head"] == "ema_branch0"
    else:
        for key in (
            "train/student1/kl",
            "train/stat/weight0",
            "test/student1/top1",
            "test/ensemble/top1",
            "lr/student1",
        ):
            assert key in row, key
        assert a["best"]["head"] == "student0"
    deploy = load_checkpoint(full / "deploy.pt")
    create_model(deploy["model"], 10).load_state_dict(deploy["state_dict"])


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
GOLDEN_KDCL_LOSSES = {
    "naive:student0/ce": 1.64342,
    "naive:student0/kl": 0.43228,
    "naive:student1/ce": 1.76712,
    "naive:student1/kl": 0.44406,
    "naive:stat/teacher_ce": 2.79337,
    "linear:student0/ce": 1.64342,
    "linear:student0/kl": 0.35198,
    "linear:student1/ce": 1.76712,
    "linear:student1/kl": 0.53241,
    "linear:stat/teacher_ce": 2.78727,
    "min_logit:student0/ce": 1.64342,
    "min_logit:student0/kl": 0.55098,
    "min_logit:student1/ce": 1.76712,
    "min_logit:student1/kl": 0.84633,
    "min_logit:stat/teacher_ce": 1.70955,
}
GOLDEN_KDCL_STEP = {
    "student0/ce": 1.21607,
    "student0/kl": 0.015227,
    "student1/ce": 1.23161,
    "student1/kl": 0.0308204,
    "stat/teacher_ce": 2.40353,
    "stat/weight0": 0.58705,
    "stat/weight1": 0.41295,
}


def test_kdcl_general_rule_fits_weights_on_the_holdout_split(cifar10_root, tmp_path):
    from okd.errors import ConfigError
    from okd.io import load_checkpoint
    from okd.methods.build import load_config

    base = [
        f"data.root={cifar10_root}",
        "data.download=false",
        "data.limit_train=160",
        "data.limit_test=50",
        "data.batch_size=32",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "model.name=resnet20",
        "method.models=[resnet20,resnet20]",
        "method.ensemble=general",
        f"output_dir={tmp_path}",
        "train.progress=none",
    ]
    with pytest.raises(ConfigError, match="data.holdout"):
        train(load_config("cifar10/kdcl_resnet32_wrn16_2", [*base, "name=nohold"]))
    run = train(load_config("cifar10/kdcl_resnet32_wrn16_2", [*base, "name=hold", "data.holdout=64"]))
    weights = load_checkpoint(run / "last.pt")["method"]["general_weights"]
    assert weights.sum().item() == pytest.approx(1.0)
    assert not torch.allclose(weights, torch.full_like(weights, 0.5))
