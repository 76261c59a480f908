"""KDCL (``docs/methods.md``, ``kdcl``): the ensembling rules by hand, losses against their equations, golden values,
detached targets, students and views, and the general rule fitted on the held-out split (training end to end
with exact resume: ``test_shared.py``)."""

from __future__ import annotations

import importlib.util
import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from cohort_fixtures import SMALL, user_module
from method_helpers import B, K, ce_manual, kl_manual
from method_helpers import views_batch as batch

from okd.config import OptimConfig
from okd.engine.trainer import train
from okd.errors import ConfigError
from okd.methods.base import Method, MethodContext
from okd.methods.build import build_method, load_config
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
from okd.models.external import ExternalNet


def make_kdcl(model: str = "resnet20", num_classes: int = K, seed: int = 0, **params) -> KDCL:
    torch.manual_seed(seed)
    return KDCL(MethodContext(model, num_classes, OptimConfig(), KDCLParams(**params), 240))


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


def test_combined_ce_is_the_batch_mean_ce_of_each_weighting():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 2, 2])
    weights = torch.tensor([[1.0, 0.0], [0.25, 0.75]], dtype=torch.float64)
    want = [F.cross_entropy(z[0], y), F.cross_entropy(0.25 * z[0] + 0.75 * z[1], y)]
    torch.testing.assert_close(combined_ce(weights, z, y), torch.stack(want))


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


def _newton(w, g, hess, ridge=0.0):
    from okd.methods.kdcl import _face_newton

    d = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return _face_newton(d(w), d(g), d(hess), torch.tensor(ridge, dtype=torch.float64))


def test_face_newton_step_by_hand_with_a_weight_at_zero():
    """The KKT solve on the simplex face: w = (1/2, 1/2, 0). Worked by hand from (H + r I) d + g = mu on the free
    set, sum d = 0, d = 0 on the active set {w_i = 0, g_i >= lambda}, lambda = the mean gradient on the support."""
    eye3 = torch.eye(3, dtype=torch.float64)
    # g = (1, 3, 5): lambda = 2 <= 5, so the zero weight stays active; H = I: mu = 2, d = (1, -1, 0)
    assert torch.allclose(
        _newton([0.5, 0.5, 0.0], [1.0, 3.0, 5.0], eye3.tolist()), torch.tensor([1.0, -1.0, 0.0]).double()
    )
    # g = (1, 3, 3): still active (lambda is the support's mean, 2, not the mean of all three)
    assert torch.allclose(
        _newton([0.5, 0.5, 0.0], [1.0, 3.0, 3.0], eye3.tolist()), torch.tensor([1.0, -1.0, 0.0]).double()
    )
    # g = (1, 3, 0): 0 < lambda = 2, so the zero weight is freed: mu = 4/3, d = (1/3, -5/3, 4/3)
    free = _newton([0.5, 0.5, 0.0], [1.0, 3.0, 0.0], eye3.tolist())
    assert torch.allclose(free, torch.tensor([1 / 3, -5 / 3, 4 / 3]).double())
    # H = diag(2, 4) on the face (its coupling to the active weight is ignored): mu = 5/3, d = (1/3, -1/3, 0)
    hess = [[2.0, 0.0, 1.0], [0.0, 4.0, 3.0], [1.0, 3.0, 8.0]]
    assert torch.allclose(_newton([0.5, 0.5, 0.0], [1.0, 3.0, 5.0], hess), torch.tensor([1 / 3, -1 / 3, 0.0]).double())
    # the ridge adds to the face's diagonal: H + 2 I = diag(4, 6): mu = 9/5, d = (1/5, -1/5, 0)
    with_ridge = _newton([0.5, 0.5, 0.0], [1.0, 3.0, 5.0], hess, ridge=2.0)
    assert torch.allclose(with_ridge, torch.tensor([0.2, -0.2, 0.0]).double())
    # inside the simplex every weight is free: H = I, mu = 3, d = (2, 0, -2)
    inside = _newton([0.2, 0.3, 0.5], [1.0, 3.0, 5.0], eye3.tolist())
    assert torch.allclose(inside, torch.tensor([2.0, 0.0, -2.0]).double())


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
    assert not w.requires_grad and not method.general_weights.requires_grad  # no graph kept, even with grad on
    target, weights = kdcl_target([torch.ones(B, K), torch.zeros(B, K)], y, KDCLParams(ensemble="general"), w)
    assert torch.allclose(target, torch.full((B, K), float(w[0])))


def test_kdcl_fit_on_holdout_refuses_an_empty_split_and_keeps_the_training_mode():
    method = make_kdcl().train()
    before = method.general_weights.clone()
    with pytest.raises(ValueError, match=r"^the held-out split yielded no batch$"):
        method.fit_on_holdout([])
    assert method.training and torch.equal(method.general_weights, before)


def test_kdcl_target_refuses_the_general_rule_without_weights_and_an_unknown_rule():
    logits, y = [torch.zeros(B, K), torch.ones(B, K)], torch.zeros(B, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^the general rule needs the held-out weights$"):
        kdcl_target(logits, y, KDCLParams(ensemble="general"))
    with pytest.raises(ValueError, match=r"^unknown ensemble rule 'vote'$"):
        kdcl_target(logits, y, KDCLParams(ensemble="vote"))


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
    second = make_kdcl(models=["resnet20", "resnet20"], deploy_student=1)  # model.name agrees: student 1, not 0
    assert second.deploy_index == 1 and second.deployed_member == 1 and second.deploy_head == "student1"
    assert second.deployable() is second.students[1]
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
        "method.deploy_student=2",
        "method.deploy_student=-1",
        "method.temperature=0",
        "method.alpha=-0.1",
        "method.linear_iters=0",
        "method.general_ridge=-1e-6",
        "method.naive_target=max",
        "method.num_students=1",
        "method.models=[resnet20,nope]",
        "method.ensemble=max",
        "method.alpha=1.5",
        "method.models=[resnet20,resnet20] method.num_students=3",
    ]
    for item in bad:
        with pytest.raises(ConfigError, match=re.escape(item.split("=")[0])):
            load_config(None, ["method.name=kdcl", *item.split()])
    KDCLParams(deploy_student=1, alpha=1.0, general_ridge=0.0, linear_iters=1).validate()  # the edges are valid
    KDCLParams(deploy_student=0, alpha=0.0).validate()
    if not hasattr(Method, "fit_on_holdout"):
        with pytest.raises(ConfigError, match="held-out"):
            load_config(None, ["method.name=kdcl", "method.ensemble=general"])


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


def test_method_models_take_import_paths_and_timm_names(tmp_path):
    """KDCL's older spelling of the cohort takes every kind of model.name, as model.members does."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with user_module(tmp_path / "code"):
        cfg = load_config(None, ["method.name=kdcl", "model.name=resnet20", f"method.models=[resnet20,'{SMALL}']"])
        m = build_method(cfg, K).eval()
        assert isinstance(m.students[1], ExternalNet) and m.names[1] == SMALL and m.deploy_head == "student0"
        with torch.no_grad():
            assert torch.equal(m.eval_outputs(x)["student1"], m.students[1](x))
    timm_cfg = load_config(
        None, ["method.name=kdcl", "model.name=resnet20", "method.models=[resnet20,'timm:resnet18']"]
    )
    if importlib.util.find_spec("timm") is None:  # the core environment: the extra is named
        with pytest.raises(ConfigError, match=r"okd\[timm\]"):
            build_method(timm_cfg, K)
    else:  # CI's timm environment: a timm student beside a registered one
        m = build_method(timm_cfg, K).eval()
        assert m.names[1] == "timm:resnet18" and m.students[1](x).shape == (2, K)
