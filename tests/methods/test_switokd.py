"""SwitOKD (okd/methods/switokd.py, docs/methods.md#switokd): the switch statistics and the loss terms against
their equations on hand-made tensors, the mode at its boundaries, what a paused teacher gets (no gradient, no
step, no momentum or weight decay; BN statistics move unless frozen), golden values from the official code's
step, the per-epoch learning rates of the CIFAR-100 script, the configs, and a short run that resumes exactly."""

from __future__ import annotations

import copy
import math

import helpers
import pytest
import torch
import torch.distributed as dist
from method_helpers import make, ref_ce, ref_kl

from okd.config import OptimConfig, TrainConfig
from okd.engine.builder import build_optimization, build_optimizer
from okd.engine.step import StepRunner
from okd.errors import ConfigError
from okd.methods import METHODS, MethodContext
from okd.methods.build import build_method, load_config
from okd.methods.switokd import expert_mode, switch_statistics, switokd_losses
from okd.models.deploy_file import build_network, read_deploy
from okd.runs.metrics import read_metrics_csv

CIFAR100 = "cifar100/switokd_wrn16_2_mobilenetv2_x0_5"
CIFAR10 = "cifar10/switokd_wrn16_8_wrn16_1"


# ----------------------------------------------------------------------------- references from the equations
def l1_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_b sum_k |p_bk - q_bk|, written out."""
    return sum(abs(p[b, k] - q[b, k]) for b in range(p.shape[0]) for k in range(p.shape[1])) / p.shape[0]


def softmax_rows(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def hand_logits():
    """Three samples of four classes, float64."""
    z_t = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [-1.0, 3.0, 0.5, 0.2]], dtype=torch.float64)
    z_s = torch.tensor([[0.3, 1.5, -0.2, 0.1], [1.0, -1.0, 0.0, 0.5], [0.0, 0.4, 2.5, -0.5]], dtype=torch.float64)
    return z_t, z_s, torch.tensor([0, 3, 1])


def test_statistics_follow_their_equations():
    z_t, z_s, y = hand_logits()
    onehot = torch.zeros(3, 4, dtype=torch.float64)
    for b, label in enumerate(y):
        onehot[b, label] = 1.0
    p_t, p_s = softmax_rows(z_t), softmax_rows(z_s)
    d_s, d_t, gap = l1_rows(p_s, onehot), l1_rows(p_t, onehot), l1_rows(p_s, p_t)
    eps = math.exp(-float(d_t) / (float(d_t) + float(d_s)))
    stats = switch_statistics(z_t, z_s, y, 4)
    for key, want in {"d_s": d_s, "d_t": d_t, "gap": gap, "epsilon": eps, "delta": d_s - eps * d_t}.items():
        assert stats[key].dtype == torch.float64, key  # float64 stays float64 (parity checks are not rounded)
        assert float(stats[key]) == pytest.approx(float(want), rel=1e-12, abs=1e-14), key
    assert not any(v.requires_grad for v in switch_statistics(z_t.requires_grad_(), z_s, y, 4).values())


def test_global_batch_statistics_are_image_weighted_means_over_every_rank(monkeypatch):
    """``global_batch``: the three means go out as sums with the image count in one SUM all-reduce; a second rank of
    5 images (faked: the all-reduce adds its sums) weighs 5 against this rank's 3, and eps and delta follow."""
    z_t, z_s, y = hand_logits()
    local = switch_statistics(z_t, z_s, y, 4)
    other = {"d_s": 0.5, "d_t": 0.25, "gap": 1.25}
    calls = []

    def all_reduce(sums, op):
        calls.append((sums.clone(), op))
        sums.add_(torch.tensor([5 * other["d_s"], 5 * other["d_t"], 5 * other["gap"], 5.0], dtype=sums.dtype))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    stats = switch_statistics(z_t, z_s, y, 4, global_batch=True)
    sent, op = calls[0]
    assert len(calls) == 1 and op == dist.ReduceOp.SUM
    torch.testing.assert_close(
        sent, torch.stack([3 * local["d_s"], 3 * local["d_t"], 3 * local["gap"], sent.new_tensor(3.0)])
    )
    want = {k: (3 * float(local[k]) + 5 * other[k]) / 8 for k in other}
    eps = math.exp(-want["d_t"] / (want["d_t"] + want["d_s"]))
    want |= {"epsilon": eps, "delta": want["d_s"] - eps * want["d_t"]}
    for key, value in want.items():
        assert float(stats[key]) == pytest.approx(value, rel=1e-12), key


def test_one_hot_width_is_the_runs_class_count():
    """A label distance against K = 7: the probability mass on the 3 extra classes counts too."""
    z = torch.zeros(1, 7)
    stats = switch_statistics(z, z, torch.tensor([2]), 7)
    assert float(stats["d_s"]) == pytest.approx(6 / 7 + (1 - 1 / 7))


def test_spec_example_a_wrong_confident_student_pauses_the_teacher():
    """Student sure of a wrong class, teacher 0.9 on the true one: d_s ~ 2, d_t = 0.2, G ~ 2 > delta ~ 1.82."""
    p_t = torch.tensor([[0.9] + [0.1 / 9] * 9], dtype=torch.float64)
    z_s = torch.tensor([[0.0, 30.0] + [0.0] * 8], dtype=torch.float64)
    stats = switch_statistics(p_t.log(), z_s, torch.tensor([0]), 10)
    assert float(stats["d_t"]) == pytest.approx(0.2) and float(stats["d_s"]) == pytest.approx(2.0, abs=1e-9)
    assert float(stats["delta"]) == pytest.approx(2.0 - math.exp(-0.2 / 2.2) * 0.2, abs=1e-9)
    # G: |0 - 0.9| on the label, |1 - 0.1/9| on the student's class, 0.1/9 on the other eight
    assert float(stats["gap"]) == pytest.approx(0.9 + (1 - 0.1 / 9) + 8 * 0.1 / 9, abs=1e-9)
    assert bool(expert_mode(stats))


@pytest.mark.parametrize(
    ("gap", "delta", "d_t", "d_s", "guarded", "unguarded"),
    [
        (1.0, 0.5, 0.2, 0.8, True, True),  # both conditions hold
        (0.5, 0.5, 0.2, 0.8, False, False),  # G == delta: learning (strict >)
        (1.0, 0.5, 0.8, 0.8, False, True),  # d_t == d_s: learning with the guard (strict <)
        (1.0, 0.5, 0.9, 0.8, False, True),  # teacher further from the labels than the student
        (0.4, 0.5, 0.2, 0.8, False, False),  # G < delta
    ],
)
def test_mode_at_its_boundaries(gap, delta, d_t, d_s, guarded, unguarded):
    stats = {k: torch.tensor(v, dtype=torch.float64) for k, v in dict(gap=gap, delta=delta, d_t=d_t, d_s=d_s).items()}
    assert bool(expert_mode(stats)) is guarded
    assert bool(expert_mode(stats, teacher_closer_guard=False)) is unguarded


def test_loss_terms_follow_their_equations():
    """CE plus KL at T = 1 without T^2, each to the other network's detached prediction."""
    z_t, z_s, y = hand_logits()
    losses = switokd_losses(z_t, z_s, y)
    torch.testing.assert_close(losses["teacher/ce"].double(), ref_ce(z_t, y), rtol=1e-6, atol=0)
    torch.testing.assert_close(losses["student/ce"].double(), ref_ce(z_s, y), rtol=1e-6, atol=0)
    torch.testing.assert_close(losses["teacher/kl"].double(), ref_kl(z_t, z_s, 1.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(losses["student/kl"].double(), ref_kl(z_s, z_t, 1.0), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------- steps and gradients
def runner_for(method) -> StepRunner:
    """The trainer's step runner over the method's optimizers (teacher first, then student)."""
    optimizers = [build_optimizer(g) for g in method.param_groups()]
    return StepRunner(method, optimizers, TrainConfig(device="cpu", channels_last=False), torch.device("cpu"))


def pair(seed: int = 0, **params):
    """A resnet20 teacher and student (K = 10), their runner (teacher 0.1, student 0.01) and a batch."""
    method = make("switokd", seed=seed, student_lr=0.01, **params)
    method.train()
    g = torch.Generator().manual_seed(1)
    return method, runner_for(method), torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)


def force_expert(method, labels):
    """A teacher sure of the (single) label, a student sure of another class: expert mode."""
    labels.zero_()
    with torch.no_grad():
        method.teacher.fc.bias[0] += 6.0
        method.student.fc.bias[1] += 12.0


def test_learning_mode_one_backward_gives_each_network_its_own_loss_gradient():
    method, runner, x, y = pair()
    twin = copy.deepcopy(method)
    losses = method.training_step(x, y, 0)
    assert float(losses["stat/expert"]) == 0.0
    sum(v for k, v in losses.items() if not k.startswith("stat/")).backward()
    z_t, z_s = twin.teacher(x), twin.student(x)
    (ref_ce(z_t, y) + ref_kl(z_t, z_s.detach(), 1.0)).backward()
    (ref_ce(z_s, y) + ref_kl(z_s, z_t.detach(), 1.0)).backward()
    for net in ("teacher", "student"):
        for (n, p), q in zip(getattr(method, net).named_parameters(), getattr(twin, net).parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=f"{net}.{n}")


@pytest.mark.parametrize("guard", [True, False])
def test_the_guard_keeps_a_teacher_further_from_the_labels_learning(guard):
    """A teacher sure of a wrong class (d_t ~ 2 > d_s ~ 1.8) is far from the student too (G ~ 1.8 > delta ~ 0.6):
    without the guard (the README's formula) that pauses the teacher; with it (official code) it keeps learning."""
    method, runner, x, y = pair(teacher_closer_guard=guard)
    y.zero_()
    with torch.no_grad():
        method.teacher.fc.bias[1] += 12.0
    losses, _ = runner.step(x, y, 0)
    assert float(losses["stat/d_t"]) > float(losses["stat/d_s"]) and float(losses["stat/gap"]) > float(
        losses["stat/delta"]
    )
    assert float(losses["stat/expert"]) == (0.0 if guard else 1.0)
    assert (method.teacher.fc.weight.grad is None) is not guard


def test_learning_step_moves_both_networks():
    method, runner, x, y = pair()
    before = copy.deepcopy(method.state_dict())
    losses, _ = runner.step(x, y, 0)
    assert float(losses["stat/expert"]) == 0.0 and float(losses["teacher/ce"]) > 0
    after = method.state_dict()
    assert not torch.equal(after["teacher.fc.weight"], before["teacher.fc.weight"])
    assert not torch.equal(after["student.fc.weight"], before["student.fc.weight"])
    assert runner.optimizers[0].state and runner.optimizers[1].state  # both momentum buffers exist


@pytest.mark.parametrize("freeze", [False, True])
def test_expert_step_leaves_the_teacher_and_its_optimizer_untouched(freeze):
    """Two steps: the first in learning mode (the teacher gets momentum buffers), the second in expert mode. After
    the expert step the teacher's parameters, gradients (None) and momentum buffers are bitwise those of before
    it; its BN running statistics moved (official code) or not (``freeze_teacher_bn_in_expert``)."""
    method, runner, x, y = pair(freeze_teacher_bn_in_expert=freeze)
    runner.step(x, y, 0)
    params = {n: p.detach().clone() for n, p in method.teacher.named_parameters()}
    state = runner.optimizers[0].state
    momentum = {n: state[p]["momentum_buffer"].clone() for n, p in method.teacher.named_parameters()}
    buffers = {n: b.clone() for n, b in method.teacher.named_buffers()}
    student = {n: p.detach().clone() for n, p in method.student.named_parameters()}
    y2 = y.clone()
    force_expert(method, y2)
    params["fc.bias"] = method.teacher.fc.bias.detach().clone()
    losses, total = runner.step(x, y2, 0)
    assert float(losses["stat/expert"]) == 1.0
    assert float(losses["teacher/ce"]) == 0.0 and float(losses["teacher/kl"]) == 0.0
    torch.testing.assert_close(total, losses["student/ce"] + losses["student/kl"])
    for n, p in method.teacher.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p, params[n]), n
        assert torch.equal(runner.optimizers[0].state[p]["momentum_buffer"], momentum[n]), n
    moved = [n for n, b in method.teacher.named_buffers() if not torch.equal(b, buffers[n])]
    assert (moved == []) if freeze else ("bn1.running_mean" in moved and "bn1.num_batches_tracked" in moved)
    assert any(not torch.equal(p, student[n]) for n, p in method.student.named_parameters())


def test_freezing_teacher_bn_changes_nothing_in_learning_mode():
    a, runner_a, x, y = pair()
    b, runner_b, _, _ = pair(freeze_teacher_bn_in_expert=True)
    runner_a.step(x, y, 0)
    runner_b.step(x, y, 0)
    for (n, u), v in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(u, v), n


# -------------------------------------------------------------------------- golden values: the official step
#: The official CIFAR-10 script's train() (hfutqian/SwitOKD a3f9623, SwitOKD_code/CIFAR-10/WRN-16-1_8/main.py),
#: run on CPU in float64 with okd's wrn16_2_switokd (teacher) and wrn16_1_switokd (student), K = 10, built with
#: torch.manual_seed(0) in float32 then cast to float64; batch: Generator seed 1, randn(8, 3, 32, 32) float64 and
#: randint(0, 10, (8,)). "expert": labels all 0, teacher fc.bias[0] += 4, student fc.bias[1] += 8. Terms from
#: the script's functions on a train-mode forward; gradients from train() with lr-0 SGD; "after2": two train()
#: steps on the batch with the script's optimizers (teacher SGD 0.1, student 0.01, momentum 0.9, wd 5e-4).
#: Sums of parameters and of the BN running statistics after those steps. (The repository's own WRN-16-1 with
#: okd's weights gives okd's logits to 1.8e-15.)
GOLDEN = {
    "learning": {
        "d_s": 1.7872694182077948,
        "d_t": 1.7997509037613797,
        "gap": 0.18914954954179283,
        "epsilon": 0.6054763275282324,
        "delta": 0.6975628505327374,
        "teacher/ce": 2.321269368994664,
        "teacher/kl": 0.026482308449041737,
        "student/ce": 2.266265309878314,
        "student/kl": 0.027102072851731347,
        "teacher_grad_sq": 3.629799412350635,
        "student_grad_sq": 1.5362036704154074,
        "teacher_after2": (973.6428405464542, 1756.693137012203),
        "student_after2": (477.0254941242106, 920.3806168939835),
    },
    "expert": {
        "d_s": 1.9988416952147678,
        "d_t": 0.3075822660363798,
        "gap": 1.9664697557021291,
        "epsilon": 0.8751509047429133,
        "delta": 1.7296607968101547,
        "student/ce": 7.455527256737531,
        "student/kl": 6.637345250112045,
        "teacher_grad_sq": None,
        "student_grad_sq": 81.76958469164991,
        "teacher_after2": (976.9114844460205, 1756.5767184198044),  # parameters unchanged, BN moved twice
        "student_after2": (485.1001009840154, 920.3583623063028),
    },
}


def golden_pair(case: str, optim: OptimConfig, student_lr: float):
    hp = METHODS.get("switokd").Params(student_lr=student_lr)
    ctx = MethodContext(
        model="wrn16_2_switokd", num_classes=10, optim=optim, params=hp, epochs=299,
        members=["wrn16_2_switokd", "wrn16_1_switokd"],
    )  # fmt: skip
    torch.manual_seed(0)
    method = METHODS.get("switokd")(ctx).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)
    if case == "expert":
        y = torch.zeros_like(y)
        with torch.no_grad():
            method.teacher.fc.bias[0] += 4.0
            method.student.fc.bias[1] += 8.0
    method.train()
    return method, runner_for(method), x, y


@pytest.mark.parametrize("case", ["learning", "expert"])
def test_golden_values_of_the_official_step(case):
    """Statistics in float64 to 1e-12; the CE and KL terms (okd computes them in float32) and the gradients to
    float32 rounding; after two real steps, the parameter and BN sums to 1e-6 relative."""
    want = GOLDEN[case]
    frozen = OptimConfig(lr=0.0, momentum=0.0, weight_decay=0.0, nesterov=False)
    method, runner, x, y = golden_pair(case, frozen, None)  # lr 0 for both: gradients, no update
    losses, _ = runner.step(x, y, 0)
    for key in ("d_s", "d_t", "gap", "epsilon", "delta"):
        assert float(losses[f"stat/{key}"]) == pytest.approx(want[key], rel=1e-12), key
    assert float(losses["stat/expert"]) == (1.0 if case == "expert" else 0.0)
    for key in ("teacher/ce", "teacher/kl", "student/ce", "student/kl"):
        if key in want:
            assert float(losses[key]) == pytest.approx(want[key], rel=2e-6, abs=1e-7), key
    grad_sq = [sum((p.grad**2).sum() for p in net.parameters()) if net.fc.weight.grad is not None else None
               for net in (method.teacher, method.student)]  # fmt: skip
    if want["teacher_grad_sq"] is None:
        assert all(p.grad is None for p in method.teacher.parameters())
    else:
        assert float(grad_sq[0]) == pytest.approx(want["teacher_grad_sq"], rel=1e-5)
    assert float(grad_sq[1]) == pytest.approx(want["student_grad_sq"], rel=1e-5)

    real = OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False)
    method, runner, x, y = golden_pair(case, real, 0.01)
    for _ in range(2):
        runner.step(x, y, 0)
    for net, key in ((method.teacher, "teacher_after2"), (method.student, "student_after2")):
        params = float(sum(p.detach().sum() for p in net.parameters()))
        stats = float(sum(b.sum() for n, b in net.named_buffers() if "running" in n))
        assert params == pytest.approx(want[key][0], rel=1e-6) and stats == pytest.approx(want[key][1], rel=1e-6)
    if case == "expert":
        assert not runner.optimizers[0].state  # the teacher's optimizer never stepped: no momentum buffer


# ------------------------------------------------------------------------------------------- schedule, configs
def lr_table(update_list: list[int], base: float) -> list[float]:
    """The official adjust_learning_rate: x0.1 at the start of each listed 1-based epoch, of range(1, 300)."""
    lr, table = base, []
    for epoch in range(1, 300):
        if epoch in update_list:
            lr = lr * 0.1
        table.append(lr)
    return table


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no steps taken here
@pytest.mark.parametrize(
    ("name", "update_list", "teacher", "student"),
    [(CIFAR100, [140, 200, 250], 0.1, 0.01), (CIFAR10, [100, 150, 200], 0.1, 0.1)],
)
def test_lr_of_every_epoch_is_the_official_scripts(name, update_list, teacher, student):
    """Spec B.5's table: CIFAR-100 teacher 0.1 / student 0.01 for epochs 1-139, x0.1 from 140, 200 and 250."""
    cfg = load_config(name, ["model.members=[resnet20,resnet20]"])  # small networks: only the optimizers matter
    assert cfg.run.train.epochs == 299
    plan = build_optimization(build_method(cfg, 10), cfg)
    assert plan.names == ["teacher", "student"]
    used = []
    for _ in range(cfg.run.train.epochs):
        used.append([o.param_groups[0]["lr"] for o in plan.optimizers])
        plan.end_of_epoch()
    assert [u[0] for u in used] == lr_table(update_list, teacher)
    assert [u[1] for u in used] == lr_table(update_list, student)
    first_decay = update_list[0] - 1  # 0-based index of the first decayed epoch
    assert used[first_decay - 1] == [teacher, student]
    assert used[first_decay] == pytest.approx([teacher / 10, student / 10], rel=1e-12)


@pytest.mark.parametrize("name", [CIFAR100, CIFAR10])
def test_configs_reproduce_the_official_settings(name):
    cfg = load_config(name)
    d = cfg.to_dict()
    cifar100 = name == CIFAR100
    assert d["recipe"] == "switokd" and d["seed"] == 1 and d["train"]["epochs"] == 299
    assert d["data"]["batch_size"] == 128 and d["data"]["test_batch_size"] == 100 and d["data"]["flip"]
    assert d["data"]["padding_mode"] == "zeros" and d["data"]["pad"] == 4
    assert d["data"]["mean"] == ([0.507, 0.487, 0.441] if cifar100 else [0.491, 0.482, 0.447])
    assert d["data"]["std"] == ([0.267, 0.256, 0.276] if cifar100 else [0.247, 0.243, 0.262])
    o = d["optim"]
    assert (o["lr"], o["momentum"], o["nesterov"], o["weight_decay"]) == (0.1, 0.9, False, 5e-4)
    assert d["method"]["student_lr"] == (0.01 if cifar100 else None)
    assert d["model"]["members"] == (
        ["wrn16_2_switokd", "mobilenetv2_x0_5"] if cifar100 else ["wrn16_8_switokd", "wrn16_1_switokd"]
    )
    assert d["method"]["teacher_closer_guard"] and not d["method"]["freeze_teacher_bn_in_expert"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.student_lr=0"], "method.student_lr must be a positive lr or null"),
        (["method.student_lr=-0.1"], "method.student_lr must be a positive lr or null"),
        (["model.members=[resnet20,resnet20,resnet20]"], "model.members lists 3 networks, but switokd builds 2"),
    ],
)
def test_bad_settings_fail_at_config_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["method.name=switokd", *overrides])


def test_heads_deployment_and_members():
    cfg = load_config(None, ["method.name=switokd", "model.members=[wrn16_2,resnet20]", "data.dataset=cifar10"])
    method = build_method(cfg, 10).eval()
    assert method.head_networks() == {"teacher": "wrn16_2", "student": "resnet20"}
    assert method.deployed_member == 1 and method.deploy_head == "student"
    x = torch.randn(2, 3, 32, 32)
    outputs = method.eval_outputs(x)
    assert set(outputs) == {"teacher", "student"}
    torch.testing.assert_close(method.deployable()(x), outputs["student"])
    assert method.deployable() is method.student


# ------------------------------------------------------------------------------------------------ end to end
def test_trains_logs_its_switch_resumes_exactly_and_deploys_the_student(cifar10_root, tmp_path):
    """A resnet20 teacher and a WRN-16-1 student, two epochs straight and one then resumed: the same weights,
    both optimizers' state and the same metrics bitwise; deploy.pt holds the student as its own network."""
    settings = {
        "model.members": "[resnet20,wrn16_1_switokd]",
        "method.student_lr": 0.01,
        "data.limit_train": 96,
        "data.limit_test": 50,
        "data.batch_size": 32,
        "train.max_steps_per_epoch": 2,
    }
    full, resumed = helpers.train_and_resume(
        CIFAR10, lambda name, epochs: helpers.quick_overrides(cifar10_root, tmp_path, name, epochs, settings)
    )
    a, b = helpers.assert_same_runs(full, resumed)
    helpers.assert_same(a["optimizers"], b["optimizers"], "optimizers")  # both optimizers' momentum, bitwise
    helpers.assert_same(a["schedulers"], b["schedulers"], "schedulers")
    assert a["head_networks"] == {"teacher": "resnet20", "student": "wrn16_1_switokd"}
    rows = read_metrics_csv(full / "metrics.csv")
    for key in ("d_s", "d_t", "gap", "epsilon", "delta", "expert"):
        assert f"train/stat/{key}" in rows[-1]
    assert 0.0 <= rows[-1]["train/stat/expert"] <= 1.0
    assert {"test/teacher/top1", "test/student/top1", "lr/teacher", "lr/student"} <= set(rows[-1])
    assert rows[0]["lr/student"] == pytest.approx(0.01) and rows[0]["lr/teacher"] == pytest.approx(0.1)
    info = read_deploy(full / "deploy.pt")
    assert (info["model"], info["method"]) == ("wrn16_1_switokd", "switokd")
    student = {k[len("student.") :]: v for k, v in a["method"].items() if k.startswith("student.")}
    helpers.assert_same(dict(build_network(info, full / "deploy.pt").state_dict()), student, "deploy.pt")


def test_a_bf16_step_runs_and_pauses_the_teacher_alike():
    """Under bf16 autocast (CPU) the statistics are computed in float32 and the expert step still leaves the
    teacher's parameters alone."""
    method, _, x, y = pair()
    force_expert(method, y)
    cfg = TrainConfig(device="cpu", channels_last=False, precision="bf16")
    runner = StepRunner(method, [build_optimizer(g) for g in method.param_groups()], cfg, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in method.teacher.named_parameters()}
    losses, total = runner.step(x, y, 0)
    assert losses["stat/gap"].dtype == torch.float32 and torch.isfinite(total)
    assert float(losses["stat/expert"]) == 1.0
    assert all(torch.equal(p, before[n]) for n, p in method.teacher.named_parameters())
