"""OKDPH (``docs/methods.md``, ``okdph``): the loss terms against their equations, the gradient as released and in
the paper's reading, the hybrid-weight model's mix (buffers included), fusion and its schedule, golden values from
the authors' code, bad input, and an end-to-end run that resumes bitwise."""

from __future__ import annotations

import copy

import helpers
import pytest
import torch
from method_helpers import K, make, ref_ce, ref_kl

from okd.config import TrainConfig
from okd.engine.builder import build_optimizer
from okd.engine.step import StepRunner
from okd.errors import ConfigError
from okd.methods.build import load_config
from okd.methods.okdph import OKDPH, OKDPHParams, fusion_schedule, okdph_losses
from okd.nn.hybrid import check_same_layout, fuse_into, mix_into
from okd.nn.losses import cross_entropy

B = 4


def views_and_labels(n_views: int = 3, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(B, 3, 16, 16, generator=g, dtype=dtype) for _ in range(n_views)]
    return views, torch.randint(0, K, (B,), generator=g)


def make_okdph(dtype=torch.float32, **params) -> OKDPH:
    return make("okdph", **params).to(dtype)


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def student_grads(method: OKDPH) -> list[list[torch.Tensor]]:
    return [[p.grad.clone() for p in s.parameters()] for s in method.students]


def perturb(method: OKDPH, seed: int = 3) -> None:
    """Make the students differ (weights and BN buffers), as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, s in enumerate(method.students):
            for v in s.state_dict().values():
                if v.is_floating_point():
                    v.add_(torch.rand(v.shape, generator=g, dtype=v.dtype) * 0.1)
                else:
                    v.fill_(3 + i)  # num_batches_tracked: 3 and 4


# ----------------------------------------------------------------------------------------------- loss terms
def test_losses_match_the_equation():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(B, K, generator=g, dtype=torch.float64) * 2 for _ in range(2)]
    z_h = torch.randn(B, K, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 4, 4, 9])
    hp = OKDPHParams(omega=0.3, beta=0.7, temperature=4.0)
    losses = okdph_losses(z, z_h, y, hp)
    target = (z[0] + z[1] + z_h) / 3  # the mean over the N students and the HWM
    for i in range(2):
        assert losses[f"student{i}/ce"].item() == pytest.approx(0.3 * ref_ce(z[i], y).item(), rel=1e-6)
        assert losses[f"student{i}/kl"].item() == pytest.approx(0.7 * ref_kl(z[i], target, 4.0).item(), rel=1e-5)
    assert losses["stat/hwm_ce"].item() == pytest.approx(ref_ce(z_h, y).item(), rel=1e-6)
    assert "hwm/ce" not in losses  # as released: logged, never trained
    through = okdph_losses(z, z_h, y, hp, hwm_ce=ref_ce(z_h, y))
    assert through["hwm/ce"].item() == pytest.approx(0.7 * ref_ce(z_h, y).item(), rel=1e-12)


def test_step_logs_the_released_loss_terms():
    method = make_okdph(torch.float64, omega=0.8, beta=0.5)
    perturb(method)
    views, y = views_and_labels(dtype=torch.float64)
    snapshot = copy.deepcopy(method)
    losses = method.training_step(views, y, 0)
    mix_into(snapshot.hwm, list(snapshot.students), [0.5, 0.5])
    snapshot.train()
    z = [s(v) for s, v in zip(snapshot.students, views, strict=False)]
    z_h = snapshot.hwm(views[2])
    target = (z[0] + z[1] + z_h) / 3
    for i in range(2):
        assert losses[f"student{i}/ce"].item() == pytest.approx(0.8 * ref_ce(z[i], y).item(), rel=1e-6)
        assert losses[f"student{i}/kl"].item() == pytest.approx(0.5 * ref_kl(z[i], target, 4.0).item(), rel=1e-5)
    assert losses["stat/hwm_weighted_ce"].item() == pytest.approx(0.2 * ref_ce(z_h, y).item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------- the HWM
def test_hwm_is_the_mean_of_the_whole_state_dicts():
    method = make_okdph(torch.float64)
    perturb(method)
    method.build_hwm([0.5, 0.5])
    a, b, h = (s.state_dict() for s in (*method.students, method.hwm))
    for key, value in h.items():
        if value.is_floating_point():
            assert torch.allclose(value, (a[key] + b[key]) / 2, rtol=0, atol=1e-15), key
        else:  # num_batches_tracked: (3 + 4) / 2, truncated
            assert int(value) == 3, key
    assert any("running_var" in k for k in h)  # buffers are mixed, not only parameters
    method.build_hwm([0.25, 0.75])
    assert torch.allclose(
        method.hwm.fc.weight, 0.25 * method.students[0].fc.weight + 0.75 * method.students[1].fc.weight
    )


def test_mixing_refuses_networks_of_different_layouts_naming_the_entries():
    same = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)]
    check_same_layout(same)
    with pytest.raises(ValueError, match=r"network 2 differs from network 0 .*\('weight', \(2, 4\)\).*equal nets"):
        check_same_layout([*same, torch.nn.Linear(4, 2)])


def test_hwm_without_buffers_keeps_its_own_statistics():
    method = make_okdph(torch.float64, mix_buffers=False)
    perturb(method)
    before = method.hwm.bn1.running_var.clone()
    method.build_hwm([0.5, 0.5])
    assert torch.equal(method.hwm.bn1.running_var, before)
    assert torch.allclose(
        method.hwm.conv1.weight, (method.students[0].conv1.weight + method.students[1].conv1.weight) / 2
    )


def test_dirichlet_weights_under_ddp_are_rank_0s_draw_broadcast(monkeypatch):
    """In a process group every rank takes rank 0's r: the draw is broadcast from rank 0 (a faked broadcast
    hands this rank rank 0's weights); the mean mix broadcasts nothing."""
    sent = []

    def broadcast(r, src):
        sent.append((src, r.dtype, r.shape))
        r.copy_(torch.tensor([0.25, 0.5, 0.25], dtype=r.dtype))

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)
    assert make_okdph(hwm_mix="dirichlet", num_students=3, views=[]).mix_weights() == [0.25, 0.5, 0.25]
    assert sent == [(0, torch.float64, (3,))]
    assert make_okdph(num_students=3, views=[]).mix_weights() == [1 / 3] * 3 and len(sent) == 1


def test_dirichlet_weights_are_a_convex_combination_from_the_global_generator():
    method = make_okdph(hwm_mix="dirichlet", num_students=3, views=[])
    torch.manual_seed(5)
    r = method.mix_weights()
    assert len(r) == 3 and abs(sum(r) - 1) < 1e-12 and min(r) > 0 and len(set(r)) == 3
    torch.manual_seed(5)
    assert method.mix_weights() == r
    assert make_okdph().mix_weights() == [0.5, 0.5]


def test_all_networks_start_identical_unless_diff_init():
    method = make_okdph()
    for net in (method.students[1], method.hwm):
        assert all(torch.equal(v, method.students[0].state_dict()[k]) for k, v in net.state_dict().items())
    other = make_okdph(diff_init=True)
    assert not torch.equal(other.students[0].conv1.weight, other.students[1].conv1.weight)
    assert not any(p.requires_grad for p in method.hwm.parameters())  # no optimizer, no gradient


def test_hwm_runs_in_train_mode_and_moves_its_own_buffers():
    method = make_okdph(torch.float64)
    views, y = views_and_labels(dtype=torch.float64)
    method.train()
    method.training_step(views, y, 0)
    # H was mixed from fresh students (running mean 0), then moved once by its own forward on its own view
    h_mean = method.hwm.bn1.running_mean
    assert h_mean.abs().sum() > 0
    assert not torch.allclose(h_mean, method.students[0].bn1.running_mean)
    assert int(method.hwm.bn1.num_batches_tracked) == 1


# -------------------------------------------------------------------------------------------- gradient flow
def released_terms_grads(method: OKDPH, views, y, r=(0.5, 0.5)) -> list[list[torch.Tensor]]:
    """Gradients of omega CE + beta KL alone (no HWM term), from a copy taken before the step (H mixed with r)."""
    m = copy.deepcopy(method)
    m.build_hwm(list(r))
    m.train()
    with torch.no_grad():
        z_h = m.hwm(views[2])
    z = [s(v) for s, v in zip(m.students, views, strict=False)]
    target = ((z[0] + z[1] + z_h) / 3).detach()
    total = sum(m.hp.omega * ref_ce(z[i], y) + m.hp.beta * ref_kl(z[i], target, m.hp.temperature) for i in range(2))
    total.backward()
    return student_grads(m)


def test_released_gradient_is_omega_ce_plus_beta_kl_alone():
    method = make_okdph(torch.float64, omega=0.3, beta=0.3)
    perturb(method)
    views, y = views_and_labels(dtype=torch.float64)
    expected = released_terms_grads(method, views, y)
    # the release's whole L_i, (1 - omega) CE(z_H) included, with H a copy that does take gradients
    whole = copy.deepcopy(method)
    whole.build_hwm([0.5, 0.5])
    whole.hwm.requires_grad_(True)
    whole.train()
    z_h = whole.hwm(views[2])
    z = [s(v) for s, v in zip(whole.students, views, strict=False)]
    terms = okdph_losses(z, z_h, y, whole.hp)
    sum(terms[f"student{i}/ce"] + terms[f"student{i}/kl"] + 0.7 * cross_entropy(z_h, y) for i in range(2)).backward()
    assert whole.hwm.fc.weight.grad.abs().sum() > 0  # the HWM loss fills H's own (unused) gradients only
    method.train()
    losses = method.training_step(views, y, 0)
    sum(v for k, v in losses.items() if not k.startswith("stat/")).backward()
    for got, want, exact in zip(student_grads(method), expected, student_grads(whole), strict=True):
        for g, w, e in zip(got, want, exact, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)  # the equations, written out by hand
            assert torch.equal(g, e)  # the HWM term adds exactly nothing
    assert all(p.grad is None for p in method.hwm.parameters())


def test_through_mix_gives_student_i_its_share_of_the_hwm_gradient():
    method = make_okdph(torch.float64, hwm_grad="through_mix", omega=0.6, hwm_mix="dirichlet")
    perturb(method)
    views, y = views_and_labels(dtype=torch.float64)
    torch.manual_seed(11)
    r = method.mix_weights()
    assert abs(r[0] - r[1]) > 0.1  # unequal shares
    released = released_terms_grads(method, views, y, r)
    # g_H: the CE gradient of a leaf copy of the mixed HWM, on its own view
    leaf = copy.deepcopy(method)
    leaf.build_hwm(r)
    leaf.hwm.requires_grad_(True).train()
    ref_ce(leaf.hwm(views[2]), y).backward()
    g_h = [p.grad for p in leaf.hwm.parameters()]
    torch.manual_seed(11)
    method.train()
    losses = method.training_step(views, y, 0)
    assert losses["stat/mix_weight0"].item() == pytest.approx(r[0])
    assert losses["hwm/ce"].requires_grad and not losses["stat/hwm_ce"].requires_grad  # the logged copy is detached
    sum(v for k, v in losses.items() if not k.startswith("stat/")).backward()
    for i, (got, want) in enumerate(zip(student_grads(method), released, strict=True)):
        for g, w, gh in zip(got, want, g_h, strict=True):
            torch.testing.assert_close(g, w + 0.4 * r[i] * gh, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- fusion
def test_fusion_rates():
    method = make_okdph(torch.float64)
    perturb(method)
    method.build_hwm([0.5, 0.5])
    student, hwm = method.students[0], method.hwm
    before = state(student)
    fuse_into(student, hwm, 0.0)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    fuse_into(student, hwm, 0.25)
    for key, value in student.state_dict().items():
        if value.is_floating_point():
            want = hwm.state_dict()[key] * 0.25 + before[key] * 0.75
            assert torch.allclose(value, want, rtol=0, atol=1e-15), key
    assert int(student.bn1.num_batches_tracked) == 3  # 3 * 0.75 + 3 * 0.25, truncated
    fuse_into(student, hwm, 1.0)
    assert all(torch.equal(v, hwm.state_dict()[k]) for k, v in student.state_dict().items())


def one_step(method: OKDPH, views, y, opts) -> None:
    losses = method.training_step(views, y, 0)
    for o in opts:
        o.zero_grad(set_to_none=True)
    sum(v for k, v in losses.items() if not k.startswith("stat/")).backward()
    for o in opts:
        o.step()
    method.after_optimizer_step()


def optimizers(method: OKDPH):
    """One SGD per student without Nesterov (the release; the configs set optim.nesterov=false)."""
    groups = method.param_groups()
    for g in groups:
        g.nesterov = False
    return [build_optimizer(g) for g in groups]


def test_epoch_fusion_uses_the_stale_hwm_and_leaves_momentum_alone():
    method = make_okdph(torch.float64, interval="1_epoch", gamma=0.5)
    opts = optimizers(method)
    views, y = views_and_labels(dtype=torch.float64)
    method.train()
    one_step(method, views, y, opts)
    hwm_of_the_step = state(method.hwm)  # built before the step's update, then moved by its forward
    pre_fusion = [state(s) for s in method.students]
    momentum = [copy.deepcopy(o.state_dict()["state"]) for o in opts]
    fresh = copy.deepcopy(method)
    method.after_evaluation(1)  # epoch 1, gap 1: due
    for s, before in zip(method.students, pre_fusion, strict=True):
        w = s.conv1.weight
        assert torch.allclose(w, hwm_of_the_step["conv1.weight"] * 0.5 + before["conv1.weight"] * 0.5, atol=1e-15)
        assert not torch.allclose(w, before["conv1.weight"])
    for o, m in zip(opts, momentum, strict=True):
        for key, value in o.state_dict()["state"].items():
            assert torch.equal(value["momentum_buffer"], m[key]["momentum_buffer"])
    fresh.hp.fresh_hwm_for_fusion = True
    mean = (fresh.students[0].conv1.weight + fresh.students[1].conv1.weight) / 2
    fresh.after_evaluation(0)
    assert torch.allclose(fresh.students[0].conv1.weight, 0.5 * mean + 0.5 * pre_fusion[0]["conv1.weight"])


def test_fusion_schedule():
    assert fusion_schedule("1_epoch") == (1, "epoch") and fusion_schedule("5_batch") == (5, "batch")
    assert fusion_schedule("") == (0, "")
    method = make_okdph(interval="2_batch", gamma=1.0)
    fused = []
    method.fuse = lambda: fused.append(method.step_in_epoch)
    for _ in range(5):
        method.after_optimizer_step()
    assert fused == [0, 2, 4]
    method.after_evaluation(0)  # a batch schedule does not fuse at the epoch's end, and steps count from 0 again
    method.after_optimizer_step()
    assert fused == [0, 2, 4, 0]
    epoch = make_okdph(interval="3_epoch")
    done = []
    for e in range(7):
        epoch.fuse = lambda e=e: done.append(e)
        epoch.after_optimizer_step()
        epoch.after_evaluation(e)
    assert done == [0, 3, 6]  # 0-based epochs, from the first one on


def test_batch_fusion_with_gamma_one_makes_the_students_equal_to_the_pre_step_mean():
    method = make_okdph(torch.float64, interval="5_batch", gamma=1.0)
    perturb(method)
    opts = optimizers(method)
    views, y = views_and_labels(dtype=torch.float64)
    mean = (method.students[0].fc.weight + method.students[1].fc.weight).detach() / 2
    method.train()
    one_step(method, views, y, opts)  # step 0: due
    assert torch.equal(method.students[0].fc.weight, method.students[1].fc.weight)
    assert torch.allclose(method.students[0].fc.weight, mean, rtol=0, atol=1e-15)


@pytest.mark.parametrize("hwm_grad", ["none", "through_mix"])
def test_a_bf16_step_gives_finite_float32_losses_and_fuses(hwm_grad):
    """One step under bf16 autocast (CPU) with batch-level fusion: every loss term is finite and float32, each
    student's parameters stay float32, and fusion still makes the pre-step mean their target."""
    method = make_okdph(interval="1_batch", gamma=1.0, hwm_grad=hwm_grad)
    perturb(method)
    cfg = TrainConfig(device="cpu", channels_last=False, precision="bf16")
    runner = StepRunner(method, optimizers(method), cfg, torch.device("cpu"))
    views, y = views_and_labels()
    losses, total = runner.step(views, y, 0)
    assert torch.isfinite(total) and total.dtype == torch.float32
    for key, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
    assert ("hwm/ce" in losses) == (hwm_grad == "through_mix")
    assert all(p.dtype == torch.float32 for p in method.parameters())
    assert torch.equal(method.students[0].fc.weight, method.students[1].fc.weight)  # gamma 1: both became H


# ------------------------------------------------------------------------------------------------ golden values
def test_golden_values_from_the_released_code():
    """Two steps (SGD 0.1, momentum 0.9, wd 5e-4, no Nesterov) with batch-level fusion every step at gamma 0.5,
    float64, from the authors' ``train()`` on the same nets and batch (docs/methods.md#okdph)."""
    torch.set_default_dtype(torch.float64)
    try:
        method = make_okdph(torch.float64, interval="1_batch", gamma=0.5)
        g = torch.Generator().manual_seed(1)
        imgs = torch.randn(B, 3, 3, 16, 16, generator=g)
        y = torch.randint(0, K, (B,), generator=g)
        opts = optimizers(method)
        method.train()
        for _ in range(2):
            one_step(method, [imgs[:, i] for i in range(3)], y, opts)
    finally:
        torch.set_default_dtype(torch.float32)
    nets = [*method.students, method.hwm]
    got = {f"net{i}/{k}": v.double().sum().item() for i, n in enumerate(nets) for k, v in n.state_dict().items()}
    got = {k: v for k, v in got.items() if k in GOLDEN}
    assert got == pytest.approx(GOLDEN, rel=1e-6, abs=1e-8)


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_anything_is_built():
    base = ["method.name=okdph"]
    cases = {
        "method.num_students=1": "num_students",
        "method.omega=1.5": "omega",
        "method.gamma=-0.1": "gamma",
        "method.beta=-1": "beta",
        "method.interval=5_batches": "interval",
        "method.interval=0_epoch": "interval",
        "method.hwm_mix=dir": "hwm_mix",
        "method.hwm_grad=all": "hwm_grad",
        "method.views=[hflip,cutout]": "num_students \\+ 1",
        "method.views=[hflip,cutout,jitter]": "unknown view",
        "method.deploy_student=2": "deploy_student",
    }
    for item, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, item])
    with pytest.raises(ConfigError, match="key-by-key mean"):
        load_config(None, [*base, "model.members=[resnet20,wrn16_2]"])
    cfg = load_config(None, [*base, "method.views=[hflip+rot,cutout,base]"])
    assert OKDPH.views_for(cfg.method_params) == 3
    assert OKDPH.view_augmentations(cfg.method_params) == ["hflip+rot", "cutout", "base"]


# ------------------------------------------------------------------------------------------------ reporting
def test_reported_heads_and_derived_metrics():
    method = make_okdph()
    heads = method.eval().eval_outputs(torch.randn(2, 3, 16, 16))
    assert set(heads) == {"student0", "student1", "hwm"}
    derived = method.derived_metrics({"student0/top1": 60.0, "student1/top1": 64.0, "hwm/top1": 66.0})
    assert derived == {"student_avg/top1": 62.0, "student_max/top1": 64.0, "any_max/top1": 66.0}
    assert method.deployable() is method.students[0]


# ------------------------------------------------------------------------------------------------ end to end
def test_okdph_trains_with_the_released_views_and_resumes_exactly(cifar10_root, tmp_path):
    settings = {
        "method.name": "okdph",
        "model.name": "resnet20",
        "data.dataset": "cifar10",
        "data.padding_mode": "zeros",
        "method.views": "[hflip+rot,cutout,augment]",
        "method.interval": "1_epoch",
        "optim.nesterov": "false",
        "data.limit_train": 96,
        "data.limit_test": 20,
        "data.batch_size": 32,
        "train.max_steps_per_epoch": 2,
    }
    full, resumed = helpers.train_and_resume(
        None, lambda name, epochs: helpers.quick_overrides(cifar10_root, tmp_path, name, epochs, settings)
    )
    helpers.assert_same_runs(full, resumed)


#: float64 sums of state_dict entries after the two steps above, from the authors' OKDPH.train()
#: (src/OKDPH.py at a562089, run with okd's resnet20 networks and batch; net2 is the HWM)
GOLDEN = {
    "net0/conv1.weight": -1.270026599764332,
    "net0/bn1.running_mean": -0.0027452493587852844,
    "net0/bn1.running_var": 14.077010151934072,
    "net0/fc.weight": -2.163366314739368,
    "net0/fc.bias": -0.45943255245099024,
    "net1/conv1.weight": -1.6894737895064407,
    "net1/bn1.running_mean": 0.004765176392996791,
    "net1/bn1.running_var": 14.037550300741616,
    "net1/fc.weight": -2.163366314739367,
    "net1/fc.bias": -0.45943255245099024,
    "net2/conv1.weight": -1.460445167021689,
    "net2/bn1.running_mean": 0.003193392632986675,
    "net2/bn1.running_var": 14.049167826161536,
    "net2/fc.weight": -2.1634690807376837,
    "net2/fc.bias": -0.45945437679233736,
}
