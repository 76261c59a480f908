"""Learning-rate schedules: exact values at chosen (epoch, step) points, stepping modes and exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from okd.config import OptimConfig
from okd.engine.builder import OptimizationPlan, _check_groups, build_optimizer, lr_scale
from okd.engine.schedules import (
    EpochCosineLR,
    IterationLR,
    build_scheduler,
    cosine_lr,
    current_lrs,
    ffsd_code_lr,
)
from okd.errors import CheckpointError, ConfigError
from okd.methods.base import ParamGroup
from okd.methods.build import load_config


def optimizer(lr: float = 0.1, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr * (i + 1)} for i in range(groups)]
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def lr_trace(sched, opt, steps: int) -> list[float]:
    """The lr each optimizer step used, stepping the scheduler after every optimizer step."""
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def code_reference(base: float, epoch: int, step: int, n: int) -> float:
    """``adjust_lr`` of SJLeo/FFSD DistributeImageNetTrainer.py, transcribed line by line."""
    factor = epoch // 30
    if epoch >= 80:
        factor = factor + 1
    lr = base * (0.1**factor)
    if epoch < 5:
        lr = lr * float(1 + step + epoch * n) / (5.0 * n)
    return lr


def test_ffsd_code_schedule_exact_values():
    n = 7
    opt = optimizer(0.1)
    sched, per_step = build_scheduler(opt, OptimConfig(schedule="ffsd_imagenet_code"), n)
    assert per_step and isinstance(sched, IterationLR)
    trace = lr_trace(sched, opt, 89 * n)
    at = {(e, s): trace[(e - 1) * n + s] for e in range(1, 90) for s in range(n)}  # e 1-based as the code
    for (e, s), lr in at.items():
        assert lr == code_reference(0.1, e, s, n)  # bitwise
    assert at[1, 0] == pytest.approx(0.1 * 8 / 35)  # (1 + 0 + 7) / 35: warm-up starts near 0.2 * base
    assert at[4, 6] == pytest.approx(0.1) and at[5, 0] == 0.1  # warm-up ends with epoch 4
    assert at[29, 6] == 0.1 and at[30, 0] == pytest.approx(0.01)  # decays at the start of epoch 30
    assert at[59, 6] == pytest.approx(0.01) and at[60, 0] == pytest.approx(0.001)
    assert at[79, 6] == pytest.approx(0.001) and at[80, 0] == pytest.approx(0.0001) == at[89, 6]
    assert ffsd_code_lr(0.8, 2, 3, 10) == 0.8 * 24 / 50


def test_code_schedule_len_epoch_and_every_group():
    # the official loader kept a partial last batch: N = len(dataset) // batch, one step more per epoch
    opt = optimizer(0.1, groups=2)
    sched, _ = build_scheduler(opt, OptimConfig(schedule="ffsd_imagenet_code"), 5, len_epoch=4)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[4][0] == code_reference(0.1, 1, 4, 4) and lrs[5][0] == code_reference(0.1, 2, 0, 4)
    assert lrs[7][1] == code_reference(0.2, 2, 2, 4)  # each group scales its own base lr


def test_paper_schedule_exact_values():
    n = 4
    cfg = OptimConfig(lr=0.8, schedule="ffsd_imagenet_paper", warmup_epochs=5, milestones=[30, 60], gamma=0.1)
    opt = optimizer(0.8)
    sched, per_step = build_scheduler(opt, cfg, n)
    assert per_step
    trace = lr_trace(sched, opt, 90 * n)
    at = {(e, s): trace[e * n + s] for e in range(90) for s in range(n)}  # e 0-based, as milestones
    assert at[0, 0] == pytest.approx(0.8 / 20) and at[2, 1] == pytest.approx(0.8 * 10 / 20)
    assert at[4, 3] == pytest.approx(0.8) and at[5, 0] == pytest.approx(0.8)  # linear to base over 5 epochs
    assert at[29, 3] == pytest.approx(0.8) and at[30, 0] == pytest.approx(0.08)
    assert at[59, 3] == pytest.approx(0.08) and at[60, 0] == pytest.approx(0.008) == at[89, 3]
    no_warmup, _ = build_scheduler(optimizer(0.8), OptimConfig(lr=0.8, schedule="ffsd_imagenet_paper"), n)
    assert no_warmup.get_last_lr() == [0.8]


def test_multistep_is_per_epoch():
    opt = optimizer(0.1)
    sched, per_step = build_scheduler(opt, OptimConfig(milestones=[2, 4], gamma=0.1), 100)
    assert not per_step and isinstance(sched, torch.optim.lr_scheduler.MultiStepLR)
    assert lr_trace(sched, opt, 5) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    # a per-iteration config can keep per-epoch MultiStepLR for some groups (FFSD's Adam SD modules)
    _, per_step = build_scheduler(optimizer(), OptimConfig(schedule="ffsd_imagenet_code"), 10, schedule="multistep")
    assert not per_step


@pytest.mark.parametrize("kind", ["ffsd_imagenet_code", "ffsd_imagenet_paper"])
def test_resume_is_exact(kind):
    cfg = OptimConfig(schedule=kind, warmup_epochs=3, milestones=[4, 6])
    n, total, cut = 6, 60, 23
    opt = optimizer(0.1)
    sched, _ = build_scheduler(opt, cfg, n)
    full = lr_trace(sched, opt, total)

    opt = optimizer(0.1)
    sched, _ = build_scheduler(opt, cfg, n)
    head = lr_trace(sched, opt, cut)
    state = {"opt": opt.state_dict(), "sched": sched.state_dict()}
    restored = torch.load(_roundtrip(state), weights_only=True)  # numbers only: loads with weights_only
    opt2 = optimizer(0.1)
    sched2, _ = build_scheduler(opt2, cfg, n)
    opt2.load_state_dict(restored["opt"])
    sched2.load_state_dict(restored["sched"])
    assert head + lr_trace(sched2, opt2, total - cut) == full


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_scheduler(optimizer(), OptimConfig(schedule="ffsd_imagenet_code"), 0)
    for len_epoch in (0, -3):
        with pytest.raises(ValueError, match=f"len_epoch must be positive, got {len_epoch}"):
            build_scheduler(optimizer(), OptimConfig(schedule="ffsd_imagenet_code"), 5, len_epoch=len_epoch)
    with pytest.raises(ConfigError, match="optim.schedule='linear'"):
        build_scheduler(optimizer(), OptimConfig(), 10, schedule="linear")
    with pytest.raises(ConfigError, match="train.epochs > 0"):
        build_scheduler(optimizer(), OptimConfig(schedule="cosine"), 10)


def test_cosine_is_per_epoch_closed_form_in_every_group():
    """lr(e) = base * 0.5 * (1 + cos(pi e / E)) for the 0-based epoch, each group from its own base lr (MCL)."""
    opt = optimizer(0.1, groups=2)
    sched, per_step = build_scheduler(opt, OptimConfig(schedule="cosine"), 390, epochs=300)
    assert not per_step and isinstance(sched, EpochCosineLR)
    lrs = []
    for _ in range(300):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for e in (0, 1, 77, 150, 299):
        assert lrs[e][0] == 0.1 * 0.5 * (1.0 + math.cos(math.pi * e / 300))  # bitwise, the reference's order
        assert lrs[e][1] == 0.2 * 0.5 * (1.0 + math.cos(math.pi * e / 300))
    assert lrs[0][0] == 0.1 and lrs[150][0] == pytest.approx(0.05, abs=1e-17)
    assert lrs[299][0] == pytest.approx(2.7416e-6, rel=1e-4)  # methods-mcl.md: lr(299) = 2.74e-6
    assert cosine_lr(0.1, 300, 300) == pytest.approx(0.0, abs=1e-18)


def test_cosine_resume_is_exact():
    cfg, total, cut = OptimConfig(schedule="cosine"), 20, 7
    opt = optimizer(0.1)
    sched, _ = build_scheduler(opt, cfg, 5, epochs=total)
    full = lr_trace(sched, opt, total)
    opt = optimizer(0.1)
    sched, _ = build_scheduler(opt, cfg, 5, epochs=total)
    head = lr_trace(sched, opt, cut)
    restored = torch.load(_roundtrip({"opt": opt.state_dict(), "sched": sched.state_dict()}), weights_only=True)
    opt2 = optimizer(0.1)
    sched2, _ = build_scheduler(opt2, cfg, 5, epochs=total)
    opt2.load_state_dict(restored["opt"])
    sched2.load_state_dict(restored["sched"])
    assert head + lr_trace(sched2, opt2, total - cut) == full
    # a run extended on resume follows the cosine of its new length (the saved E is not restored)
    opt3 = optimizer(0.1)
    longer, _ = build_scheduler(opt3, cfg, 5, epochs=2 * total)
    opt3.load_state_dict(restored["opt"])
    longer.load_state_dict(restored["sched"])
    assert longer.epochs == 2 * total and longer.last_epoch == cut
    assert opt3.param_groups[0]["lr"] == cosine_lr(0.1, cut, 2 * total) == longer.get_last_lr()[0]


# ------------------------------------------------------------------------------------------------ optimizers
def test_build_optimizer_takes_each_groups_settings():
    """SGD with the group's lr, momentum and weight decay, Nesterov only when asked and there is momentum (torch
    refuses Nesterov without it); Adam with its betas and eps; anything else is refused by name."""
    from okd.engine.builder import build_optimizer
    from okd.methods.base import ParamGroup

    def settings(**kw) -> dict:
        opt = build_optimizer(ParamGroup("g", [torch.nn.Parameter(torch.zeros(2))], **kw))
        return {k: v for k, v in opt.param_groups[0].items() if k != "params"} | {"cls": type(opt).__name__}

    sgd = settings(lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=True)
    assert (sgd["cls"], sgd["lr"], sgd["momentum"], sgd["weight_decay"], sgd["nesterov"]) == (
        "SGD",
        0.05,
        0.8,
        1e-3,
        True,
    )
    assert settings(momentum=0.9, nesterov=False)["nesterov"] is False
    assert settings(momentum=0.0, nesterov=True)["nesterov"] is False
    adam = settings(optimizer="adam", lr=1e-3, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.0)
    assert (adam["cls"], adam["lr"], adam["betas"], adam["eps"], adam["weight_decay"]) == (
        "Adam",
        1e-3,
        (0.5, 0.9),
        1e-6,
        0,
    )
    with pytest.raises(ValueError, match="unknown optimizer 'lamb' in group 'g'"):
        settings(optimizer="lamb")


def test_the_plan_steps_epoch_schedules_at_the_end_of_each_epoch():
    """MultiStepLR decays at its milestone when end_of_epoch is called; the per-iteration schedules are left to
    the step runner (stepped there, not at the epoch's end)."""
    from okd.engine.builder import build_optimization
    from okd.methods.build import build_method, load_config

    for schedule, per_step in (("multistep", False), ("ffsd_imagenet_code", True)):
        overrides = ["model.name=resnet20", "optim.milestones=[1]", f"optim.schedule={schedule}"]
        cfg = load_config("cifar10/baseline_resnet20", overrides)
        plan = build_optimization(build_method(cfg, 10), cfg, steps_per_epoch=3)
        assert plan.per_step == [per_step] and (plan.step_schedulers != []) == per_step
        before = plan.learning_rates()["lr/net"]
        for opt in plan.optimizers:
            opt.step()  # no gradients: nothing moves, but the scheduler sees a step first
        plan.end_of_epoch()
        after = plan.learning_rates()["lr/net"]
        assert after == (before if per_step else pytest.approx(before * 0.1))


def test_a_checkpoint_whose_schedulers_do_not_match_the_optimizers_is_refused():
    """Each optimizer's schedule is restored beside it; a scheduler list of another length is never half-loaded."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    plan = OptimizationPlan(["net"], [opt], [torch.optim.lr_scheduler.StepLR(opt, 2)], [False])
    state = plan.state_dict()
    plan.load_state_dict(state)
    with pytest.raises(ValueError):
        plan.load_state_dict({**state, "schedulers": []})


def test_schedules_refuse_what_they_cannot_follow():
    """A cosine over no epoch, a per-iteration schedule of an unknown kind, a negative warm-up: each is named."""
    with pytest.raises(ValueError, match=r"^epochs must be positive, got 0$"):
        EpochCosineLR(optimizer(), 0)
    with pytest.raises(ValueError, match=r"^unknown per-iteration schedule 'linear'$"):
        IterationLR(optimizer(), "linear", 5)
    for kind in ("ffsd_imagenet_code", "ffsd_imagenet_paper"):
        with pytest.raises(ConfigError, match=r"^optim\.warmup_epochs must be >= 0, got -1$"):
            build_scheduler(optimizer(), OptimConfig(schedule=kind, warmup_epochs=-1), 5)


def test_a_constant_schedule_never_decays_and_is_stepped_per_epoch():
    opt = optimizer(0.1)
    sched, per_step = build_scheduler(opt, OptimConfig(milestones=[1, 2], gamma=0.1), 10, schedule="constant")
    assert not per_step and isinstance(sched, torch.optim.lr_scheduler.MultiStepLR) and sched.milestones == {}
    assert lr_trace(sched, opt, 4) == [0.1] * 4


def test_current_lrs_are_the_rates_of_every_group():
    opt = optimizer(0.1, groups=2)
    sched, _ = build_scheduler(opt, OptimConfig(milestones=[1], gamma=0.5), 10)
    assert current_lrs(sched) == [0.1, 0.2]
    opt.step()
    sched.step()
    assert current_lrs(sched) == [0.05, 0.1]


def test_parameter_groups_must_not_share_a_parameter():
    net = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match=r"^parameter in both groups 'a' and 'b'$"):
        _check_groups(net, [ParamGroup("a", [net.weight, net.bias]), ParamGroup("b", [net.bias])])
    with pytest.raises(RuntimeError, match=r"^trainable parameters in no optimizer group: \['bias'\]$"):
        _check_groups(net, [ParamGroup("a", [net.weight])])
    _check_groups(net, [ParamGroup("a", [net.weight]), ParamGroup("b", [net.bias])])


class _UnfusedSGD(torch.optim.SGD):
    """An SGD that refuses the fused implementation, as an older torch or an unsupported device does."""

    def __init__(self, params, fused=None, **kwargs):
        if fused:
            raise RuntimeError("fused=True is not supported here")
        super().__init__(params, **kwargs)


def test_an_optimizer_falls_back_to_the_plain_implementation_where_fused_is_refused(monkeypatch):
    """Fused where torch offers it; where it is refused, or a parameter is not floating point, the plain one with
    the group's settings."""
    assert build_optimizer(ParamGroup("g", [torch.nn.Parameter(torch.zeros(2))])).defaults["fused"] is True
    complex_group = ParamGroup("c", [torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))], lr=0.3)
    plain = build_optimizer(complex_group)
    assert not plain.defaults["fused"] and plain.defaults["lr"] == 0.3
    monkeypatch.setattr(torch.optim, "SGD", _UnfusedSGD)
    fallback = build_optimizer(ParamGroup("g", [torch.nn.Parameter(torch.zeros(2))], lr=0.2, momentum=0.5))
    assert type(fallback) is _UnfusedSGD and not fallback.defaults["fused"]
    assert (fallback.defaults["lr"], fallback.defaults["momentum"]) == (0.2, 0.5)


def test_a_checkpoint_with_another_number_of_optimizers_is_refused_by_count():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    plan = OptimizationPlan(["net"], [opt], [torch.optim.lr_scheduler.StepLR(opt, 2)], [False])
    state = plan.state_dict()
    refused = r"^the checkpoint has 2 optimizers but the method builds 1; it was written by another method or method"
    with pytest.raises(CheckpointError, match=refused):
        plan.load_state_dict({**state, "optimizers": state["optimizers"] * 2})


def test_linear_lr_scaling_multiplies_by_the_batch_over_the_reference_batch():
    scaled = load_config(None, ["optim.lr_scaling=linear", "data.batch_size=256", "optim.reference_batch=128"])
    assert lr_scale(scaled) == 2.0
    half = load_config(None, ["optim.lr_scaling=linear", "data.batch_size=32", "optim.reference_batch=64"])
    assert lr_scale(half) == 0.5
    assert lr_scale(load_config(None, ["data.batch_size=256"])) == 1.0  # optim.lr_scaling=none
