"""Tests over several methods at once. The peer methods (DML, KD, ONE, CL-ILR, individual, OKDDip, FFL, DML+SL,
ONE+SL; ``docs/methods.md``): each loss dict and every gradient against a reference written from the equations
(``method_helpers.py``), golden values, config validation, heads and the deployable network, and training end to end
through the trainer on a real CIFAR-10 subset with exact resume; PCL and KDCL end to end with exact resume.
The tests of one method alone are in ``test_<method>.py``."""

from __future__ import annotations

import math
from pathlib import Path

import helpers
import pytest
import torch
from method_helpers import (
    K,
    batch,
    branch_outputs,
    close,
    fusion_ref,
    make,
    one_ref,
    ramp,
    ref_ce,
    ref_kl,
    sl_ref,
    summed,
)
from torch import Tensor

from okd.config import OptimConfig
from okd.errors import ConfigError
from okd.io import load_checkpoint
from okd.methods.base import METHODS
from okd.methods.build import build_config, load_config
from okd.models import create_model
from okd.nn.losses import rampup_0based

PEER_METHODS = ["dml", "kd", "one", "cl_ilr", "individual", "okddip", "ffl", "dml_sl", "one_sl"]


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


# ---------------------------------------------------------------------- each loss dict vs its equation
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


# ----------------------------------------------------------------------------------- config validation
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


@pytest.mark.parametrize(
    "name, prefix, members",
    [
        ("one", "", ["branch0", "branch1", "branch2", "branch3"]),
        ("okddip", "peer_", ["peer0", "peer1", "peer2"]),  # the leader is left out
        ("ffl", "", ["branch0", "branch1"]),
        ("dml_sl", "", ["net0", "net1"]),
    ],
)
def test_ensemble_heads_combine_every_member_and_only_them(name, prefix, members):
    """``<prefix>mean_logits`` is the mean of the members' logits, ``<prefix>ensemble`` the log of the mean of their
    softmaxes."""
    with torch.no_grad():
        heads = make(name).eval().eval_outputs(batch()[0])
    logits = torch.stack([heads[m] for m in members])
    close(heads[f"{prefix}mean_logits"], logits.mean(0))
    close(heads[f"{prefix}ensemble"], logits.softmax(-1).mean(0).log())


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


# --------------------------------------------------------------------------------------- golden values
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


# ---------------------------------------------------------------------- end to end through the trainer
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


@pytest.mark.parametrize("name", ["one", "cl_ilr", "individual", "ffl"])
def test_branch_methods_oracle_and_average_cover_every_branch(name):
    """The oracle names every branch, the last included, and ``branch_avg`` averages all of them."""
    m = make(name, num_branches=3)
    assert m.oracle_groups() == {"oracle_any_branch": ["branch0", "branch1", "branch2"]}
    metrics = {f"branch{i}/top1": 10.0 * (i + 1) for i in range(3)} | {f"branch{i}/top5": 50.0 + i for i in range(3)}
    assert m.derived_metrics(metrics) == {"branch_avg/top1": 20.0, "branch_avg/top5": 51.0}


def test_every_methods_oracle_names_all_of_its_heads():
    """Each oracle group lists every head of its kind (the last one included) and only heads that exist."""
    expected = {
        "dml": {"oracle_any_net": ["net0", "net1"]},
        "okddip": {"oracle_any_peer": ["peer0", "peer1", "peer2"]},
    }
    for name, groups in expected.items():
        assert make(name).oracle_groups() == groups


# --------------------------------------------------------- PCL and KDCL end to end through the trainer
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


@pytest.mark.slow
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
