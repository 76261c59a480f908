"""SwitOKD's three-network variants (okd/methods/switokd_multi.py, docs/methods.md#switokd): the eps pairing quirk
and its switch, 1T2S's pair weights and its teacher that moves on an all-zero loss, 2T1S's paused teachers
(bitwise unchanged, momentum included), golden values from the official multi-net scripts' step, the Table 7
configs and their published rows, and a short run that resumes exactly."""

from __future__ import annotations

import copy
import math

import helpers
import pytest
import torch
from method_helpers import make, ref_ce, ref_kl

from okd.config import OptimConfig, TrainConfig
from okd.engine.builder import build_optimization, build_optimizer
from okd.engine.step import StepRunner
from okd.errors import ConfigError
from okd.methods import METHODS, MethodContext, switokd_multi
from okd.methods.build import build_method, load_config
from okd.methods.switokd import expert_mode
from okd.methods.switokd_multi import peer_losses, with_epsilon_of
from okd.models.deploy_file import read_deploy
from okd.runs.metrics import read_metrics_csv

C1T2S = "cifar100/switokd_1t2s_wrn16_10_wrn16_2_mobilenetv1"
C2T1S = "cifar100/switokd_2t1s_wrn16_2_wrn16_10_mobilenetv1"


def runner_for(method) -> StepRunner:
    optimizers = [build_optimizer(g) for g in method.param_groups()]
    return StepRunner(method, optimizers, TrainConfig(device="cpu", channels_last=False), torch.device("cpu"))


def trio(name: str, **params):
    """Three resnet20s (K = 10; the last on Adam), their runner and a 16x16 batch of four."""
    method = make(name, **params)
    method.train()
    g = torch.Generator().manual_seed(1)
    return method, runner_for(method), torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)


def forced(monkeypatch, experts: list[bool]) -> None:
    """Make every step's pair decisions ``experts`` (pair 1, pair 2), keeping the real statistics."""
    real = switokd_multi.pair_switches

    def fake(logits, pairs, *args, **kwargs):
        stats, _ = real(logits, pairs, *args, **kwargs)
        order = experts[::-1] if pairs[0] == (1, 2) else experts  # 2T1S lists its borrowing pair 2 first
        return stats, [torch.tensor(e) for e in order]

    monkeypatch.setattr(switokd_multi, "pair_switches", fake)


# ------------------------------------------------------------------------------ the rules on hand-made tensors
def test_borrowed_epsilon_follows_its_equation_and_can_flip_the_mode():
    """A pair with d_t = 0.5, d_s = 1 and G = 0.62: its own eps = exp(-1/3) gives delta = 0.642 > G (learning);
    eps from a pair with d_s = 2 is exp(-1/5), delta = 0.591 < G (expert): the official pairing changes the mode."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    own = {"d_s": t(1.0), "d_t": t(0.5), "gap": t(0.62)}
    own.update(epsilon=torch.exp(t(-0.5 / 1.5)), delta=t(1.0) - torch.exp(t(-0.5 / 1.5)) * 0.5)
    other = {"d_s": t(2.0), "d_t": t(0.5), "gap": t(1.0)}
    borrowed = with_epsilon_of(own, other)
    assert float(borrowed["epsilon"]) == pytest.approx(math.exp(-0.2), rel=1e-15)
    assert float(borrowed["delta"]) == pytest.approx(1.0 - 0.5 * math.exp(-0.2), rel=1e-15)
    assert (borrowed["d_s"], borrowed["d_t"], borrowed["gap"]) == (own["d_s"], own["d_t"], own["gap"])
    assert not bool(expert_mode(own)) and bool(expert_mode(borrowed))


@pytest.mark.parametrize("fix", [False, True])
@pytest.mark.parametrize("name", ["switokd_1t2s", "switokd_2t1s"])
def test_which_pair_borrows_its_epsilon(name, fix):
    """1T2S: pair 1 (teacher, student1) takes eps from pair 2's distances; 2T1S: pair 2 (teacher2, student) from
    pair 1's; ``fix_eps_pairing`` gives each pair its own."""
    method, _, x, y = trio(name, fix_eps_pairing=fix)
    losses = method.training_step(x, y, 0)
    own = lambda p: math.exp(-float(losses[f"stat/{p}_d_t"]) / float(losses[f"stat/{p}_d_t"] + losses[f"stat/{p}_d_s"]))  # noqa: E731
    borrower, lender = ("pair1", "pair2") if name == "switokd_1t2s" else ("pair2", "pair1")
    assert float(losses[f"stat/{lender}_epsilon"]) == pytest.approx(own(lender), rel=1e-6)
    want = own(borrower) if fix else own(lender)
    assert float(losses[f"stat/{borrower}_epsilon"]) == pytest.approx(want, rel=1e-6)
    assert own("pair1") != pytest.approx(own("pair2"), rel=1e-6)  # the two pairings differ on this batch
    for p in ("pair1", "pair2"):
        d_s, d_t, eps = (float(losses[f"stat/{p}_{k}"]) for k in ("d_s", "d_t", "epsilon"))
        assert float(losses[f"stat/{p}_delta"]) == pytest.approx(d_s - eps * d_t, rel=1e-6)


def test_peer_losses_follow_their_equations():
    z = [torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    y = torch.tensor([0, 4, 2])
    for i in range(3):
        terms = peer_losses(z, y, i)
        assert set(terms) == {"ce"} | {f"kl{j}" for j in range(3) if j != i}
        assert float(terms["ce"]) == pytest.approx(float(ref_ce(z[i], y)), rel=1e-6)
        for j in (j for j in range(3) if j != i):
            assert float(terms[f"kl{j}"]) == pytest.approx(float(ref_kl(z[i], z[j], 1.0)), rel=1e-6)
    w = [zz.clone().requires_grad_() for zz in z]
    peer_losses(w, y, 0)["kl1"].backward()
    assert w[1].grad is None and w[0].grad is not None  # the target is detached


@pytest.mark.parametrize(("experts", "weights"), [([False, False], (1, 1, 1)), ([True, False], (1, 0, 1)),
                                                   ([False, True], (1, 1, 0)), ([True, True], (0, 0, 0))])  # fmt: skip
def test_1t2s_pair_weights(monkeypatch, experts, weights):
    """w1 = 0 iff pair 1 is expert, w2 = 0 iff pair 2 is, w0 = 0 iff both: the teacher's CE carries w0, its KL
    to student1 w1 and to student2 w2; the students' terms are never weighted."""
    forced(monkeypatch, experts)
    method, _, x, y = trio("switokd_1t2s")
    losses = {k: v.detach() for k, v in method.training_step(x, y, 0).items()}
    z = [copy.deepcopy(n)(x).detach() for n in method.nets]
    assert tuple(float(losses[f"stat/w{i}"]) for i in range(3)) == weights
    raw = peer_losses(z, y, 0)
    for key, w in (("ce", weights[0]), ("kl1", weights[1]), ("kl2", weights[2])):
        assert float(losses[f"teacher/{key}"]) == pytest.approx(w * float(raw[key]), rel=1e-6)
    for i, head in ((1, "student1"), (2, "student2")):
        for key, v in peer_losses(z, y, i).items():
            assert float(losses[f"{head}/{key}"]) == pytest.approx(float(v), rel=1e-6)


def test_1t2s_teacher_steps_on_an_all_zero_loss(monkeypatch):
    """Both pairs expert: the teacher's gradient is zero (not None) and SGD still moves it (weight decay and a
    momentum buffer); the students step as usual."""
    forced(monkeypatch, [True, True])
    method, runner, x, y = trio("switokd_1t2s")
    before = [copy.deepcopy(n.state_dict()) for n in method.nets]
    losses, _ = runner.step(x, y, 0)
    assert float(losses["teacher/ce"].detach()) == 0.0 and float(losses["teacher/kl1"].detach()) == 0.0
    teacher = method.nets[0]
    assert all(p.grad is not None and not p.grad.any() for p in teacher.parameters())
    assert runner.optimizers[0].state  # momentum buffers exist
    group = runner.optimizers[0].param_groups[0]  # first step: buffer = wd * w; update = buffer (x (1 + m) Nesterov)
    shrink = group["lr"] * group["weight_decay"] * ((1 + group["momentum"]) if group["nesterov"] else 1.0)
    assert shrink > 0
    torch.testing.assert_close(teacher.fc.weight, before[0]["fc.weight"] * (1 - shrink), rtol=1e-6, atol=1e-9)
    for net, old in zip(method.nets[1:], before[1:], strict=True):
        assert not torch.equal(net.fc.weight, old["fc.weight"])


def test_2t1s_paused_teacher_is_bitwise_unchanged_momentum_included(monkeypatch):
    """A learning step (momentum buffers exist), then teacher2 paused: its parameters, gradients (None) and
    optimizer state stay as they were, bitwise; teacher1 and the student step. BN statistics still move."""
    method, runner, x, y = trio("switokd_2t1s")
    forced(monkeypatch, [False, False])
    runner.step(x, y, 0)
    paused = method.nets[1]
    params = {n: p.detach().clone() for n, p in paused.named_parameters()}
    state = copy.deepcopy(runner.optimizers[1].state_dict())
    running = paused.bn1.running_mean.clone() if hasattr(paused, "bn1") else None
    others = [n.fc.weight.detach().clone() for n in (method.nets[0], method.nets[2])]
    forced(monkeypatch, [False, True])
    losses, _ = runner.step(x, y, 0)
    assert float(losses["stat/pair2_expert"]) == 1.0 and float(losses["teacher2/ce"]) == 0.0
    assert all(torch.equal(p, params[n]) and p.grad is None for n, p in paused.named_parameters())
    helpers.assert_same(runner.optimizers[1].state_dict(), state, "paused teacher's optimizer")
    if running is not None:
        assert not torch.equal(paused.bn1.running_mean, running)
    for net, old in zip((method.nets[0], method.nets[2]), others, strict=True):
        assert not torch.equal(net.fc.weight, old)


def test_the_last_member_trains_with_adam_the_others_with_the_runs_sgd():
    method = make("switokd_2t1s")
    groups = method.param_groups()
    assert [g.name for g in groups] == ["teacher1", "teacher2", "student"]
    assert [g.optimizer for g in groups] == ["sgd", "sgd", "adam"]
    assert (groups[2].lr, groups[2].weight_decay, groups[2].betas, groups[2].eps) == (0.01, 1e-4, (0.9, 0.999), 1e-8)
    assert isinstance(build_optimizer(groups[2]), torch.optim.Adam)
    sgd = make("switokd_1t2s", last_optimizer="sgd").param_groups()
    assert [g.optimizer for g in sgd] == ["sgd"] * 3 and sgd[2].lr == OptimConfig().lr


# -------------------------------------------------------------------------- golden values: the official step
#: The official multi-net scripts' train() (hfutqian/SwitOKD, "SwitOKD_code/multi-net results (table 7)/{1T2S,
#: 2T1S}/CIFAR_100_wrn16-10_wrn16-2_mobilenet/main.py"), run on CPU in float64 with okd's networks (K = 100,
#: built in member order with torch.manual_seed(0) in float32, cast to float64): 1T2S [wrn16_2_switokd (teacher,
#: the script's model2), wrn16_1_switokd (model), mobilenetv1 (model_ks2)], 2T1S [wrn16_1_switokd (model),
#: wrn16_2_switokd (model2), mobilenetv1 (model_ks2)]. Batch: Generator seed 1, randn(6, 3, 32, 32) float64,
#: randint(0, 100, (6,)); in the pushed cases the labels are all 0 and fc.bias[class] += amount per member
#: (PUSH). d: each network's label distance; gap: G between networks i and j; delta: as the 1T2S script prints
#: it (pair 1, pair 2); grad_sq: sum of squared gradients after train() with lr-0 SGD (None: no gradient);
#: after2: (parameter sum, BN running-statistics sum) after two train() steps on the batch with the script's
#: optimizers (SGD 0.1, momentum 0.9, wd 5e-4; the MobileNet Adam 0.01, wd 1e-4). The repository's MobileNet
#: with okd's mobilenetv1 weights gives okd's logits exactly (max difference 0.0).
MEMBERS = {"1t2s": ["wrn16_2_switokd", "wrn16_1_switokd", "mobilenetv1"],
           "2t1s": ["wrn16_1_switokd", "wrn16_2_switokd", "mobilenetv1"]}  # fmt: skip
PUSH = {
    "1t2s/all_expert": [(0, 4.0), (1, 8.0), (1, 8.0)],
    "1t2s/mixed": [(0, 4.0), (1, 8.0), (0, 0.0)],
    "2t1s/both_paused": [(0, 4.0), (0, 4.0), (1, 8.0)],
    "2t1s/one_paused": [(2, 16.0), (0, 4.0), (1, 8.0)],
}
GOLDEN = {
    "1t2s/learning": {
        "d": [1.9793194652141721, 1.9806669274899378, 1.980131785291915],
        "gap": {"01": 0.24114628826887288, "02": 0.17003076283677818},
        "delta": [0.7800258311672477, 0.7794906889692248],
        "experts": [0, 0],
        "ce": [4.594082506426162, 4.6692705350449915, 4.6123904335101],
        "grad_sq": [3.987507753282089, 2.2428737602939774, 1974.5452407391451],
        "after2": [(966.7482406096279, 1852.960922524081), (448.2723136787015, 894.0818456573024),
                   (10222.347857004306, 8925.281494022236)],
    },
    "1t2s/all_expert": {
        "d": [1.3828793376704784, 1.9994622015481902, 1.999341186515327],
        "gap": {"01": 1.8998079080588195, "02": 1.9239477583030904},
        "delta": [1.0806738510305736, 1.0805528359977103],
        "experts": [1, 1],
        "ce": [1.1761820698430372, 8.22513569700392, 8.018271780858997],
        "grad_sq": [0.0, 59.7701325366627, 3392.128092020194],
        "after2": [(970.1961562257766, 1851.6741272568993), (458.0394995512654, 894.5271901281025),
                   (11321.761963956718, 8931.251622999871)],
    },
    "1t2s/mixed": {
        "d": [1.3828793376704784, 1.9994622015481902, 1.980477595149713],
        "gap": {"01": 1.8998079080588195, "02": 0.6079953312122856},
        "delta": [1.08277836305076, 1.063793756652283],
        "experts": [1, 0],
        "ce": [1.1761820698430372, 8.22513569700392, 4.629379813850682],
        "grad_sq": [3.3272369776520616, 111.55421202449205, 1407.8377552262348],
        "after2": [(970.0557668485112, 1851.7336527983175), (457.8719721648669, 894.6948804975264),
                   (9627.498391748277, 8930.454757615187)],
    },
    "2t1s/learning": {
        "d": [1.9809953160815101, 1.9812504508102142, 1.980131785291915],
        "gap": {"02": 0.21779721431947585, "12": 0.17776030835974463},
        "experts": [0, 0],
        "ce": [4.7164712340160975, 4.687211454161077, 4.6123904335101],
        "grad_sq": [2.2342527862202535, 4.097577028691682, 1963.4519512285262],
        "after2": [(509.29658142331124, 902.6305729556011), (927.5737343852586, 1831.253406342813),
                   (10252.266174466497, 8925.60451698213)],
    },
    "2t1s/both_paused": {
        "d": [1.4319467012392504, 1.304119146354364, 1.999341186515327],
        "gap": {"02": 1.924708644055527, "12": 1.9194608162763813},
        "experts": [1, 1],
        "ce": [1.2592892716306265, 1.0563229777981455, 8.018271780858997],
        "grad_sq": [None, None, 6801.360507479882],
        "after2": [(513.5112526127302, 903.5026721352137), (931.377521528468, 1830.6470213177124),
                   (11475.095375535215, 8931.580364725767)],
    },
    "2t1s/one_paused": {
        "d": [1.9999997696942946, 1.304119146354364, 1.999341186515327],
        "gap": {"02": 1.999304213631356, "12": 1.9194608162763813},
        "experts": [0, 1],
        "ce": [15.979203440991085, 1.0563229777981455, 8.018271780858997],
        "grad_sq": [133.05673135758175, None, 6820.2280688634155],
        "after2": [(527.4723213992229, 904.5385360398074), (931.4134227636406, 1830.6470213177124),
                   (11248.87713408926, 8934.132872892442)],
    },
}  # fmt: skip


def golden_trio(case: str, real: bool):
    variant = case.split("/")[0]
    name = f"switokd_{variant}"
    hp = METHODS.get(name).Params() if real else METHODS.get(name).Params(last_optimizer="sgd")
    optim = OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False)
    if not real:
        optim = OptimConfig(lr=0.0, momentum=0.0, weight_decay=0.0, nesterov=False)
    ctx = MethodContext(model="resnet20", num_classes=100, optim=optim, params=hp, epochs=269,
                        members=MEMBERS[variant])  # fmt: skip
    torch.manual_seed(0)
    method = METHODS.get(name)(ctx).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 100, (6,), generator=g)
    if case in PUSH:
        y = torch.zeros_like(y)
        with torch.no_grad():
            for net, (c, amount) in zip(method.nets, PUSH[case], strict=True):
                net.fc.bias[c] += amount
    method.train()
    return method, runner_for(method), x, y


@pytest.mark.parametrize("case", list(GOLDEN))
def test_golden_values_of_the_official_step(case):
    """Distances, gaps and deltas in float64 to 1e-12; the decisions; CE terms to float32 rounding; gradients
    (lr 0) to 1e-5; after two real steps the parameter and BN sums to 1e-6 relative."""
    want = GOLDEN[case]
    method, runner, x, y = golden_trio(case, real=False)
    losses = {k: v.detach() for k, v in runner.step(x, y, 0)[0].items()}
    pairs = [(0, 1), (0, 2)] if case.startswith("1t2s") else [(0, 2), (1, 2)]
    for p, (t, s) in enumerate(pairs, start=1):
        assert float(losses[f"stat/pair{p}_d_t"]) == pytest.approx(want["d"][t], rel=1e-12)
        assert float(losses[f"stat/pair{p}_d_s"]) == pytest.approx(want["d"][s], rel=1e-12)
        assert float(losses[f"stat/pair{p}_gap"]) == pytest.approx(want["gap"][f"{t}{s}"], rel=1e-12)
        if "delta" in want:
            assert float(losses[f"stat/pair{p}_delta"]) == pytest.approx(want["delta"][p - 1], rel=1e-12)
        assert float(losses[f"stat/pair{p}_expert"]) == want["experts"][p - 1]
    for head, ce in zip(method.HEADS, want["ce"], strict=True):
        if float(losses[f"{head}/ce"]) != 0.0:
            assert float(losses[f"{head}/ce"]) == pytest.approx(ce, rel=2e-6)
    for net, sq in zip(method.nets, want["grad_sq"], strict=True):
        if sq is None:
            assert all(p.grad is None for p in net.parameters())
        else:
            assert float(sum((p.grad**2).sum() for p in net.parameters())) == pytest.approx(sq, rel=1e-5, abs=1e-12)

    method, runner, x, y = golden_trio(case, real=True)
    for _ in range(2):
        runner.step(x, y, 0)
    for net, (params, stats) in zip(method.nets, want["after2"], strict=True):
        assert float(sum(p.detach().sum() for p in net.parameters())) == pytest.approx(params, rel=1e-6)
        assert float(sum(b.sum() for n, b in net.named_buffers() if "running" in n)) == pytest.approx(stats, rel=1e-6)


# ------------------------------------------------------------------------------------------- schedule, configs
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no steps taken here
@pytest.mark.parametrize("name", [C1T2S, C2T1S])
def test_configs_reproduce_the_official_settings(name):
    """The three-network scripts line by line: seed 1, batch 128/100, zero padding 4, flips, SwitOKD's CIFAR-100
    normalisation; the WRNs on SGD 0.1, momentum 0.9, no Nesterov, wd 5e-4; the MobileNet on Adam 0.01, wd 1e-4
    with N(0, 1/fan_in) init; every lr x0.1 at the start of epochs 140, 200 and 250 of range(1, 270)."""
    cfg = load_config(name)
    d = cfg.to_dict()
    assert d["recipe"] == "switokd_multi" and d["seed"] == 1 and d["train"]["epochs"] == 269
    assert d["data"]["dataset"] == "cifar100" and d["data"]["batch_size"] == 128 and d["data"]["test_batch_size"] == 100
    assert d["data"]["padding_mode"] == "zeros" and d["data"]["pad"] == 4 and d["data"]["flip"]
    assert d["data"]["mean"] == [0.507, 0.487, 0.441] and d["data"]["std"] == [0.267, 0.256, 0.276]
    o = d["optim"]
    assert (o["lr"], o["momentum"], o["nesterov"], o["weight_decay"]) == (0.1, 0.9, False, 5e-4)
    m = d["method"]
    assert (m["last_optimizer"], m["last_lr"], m["last_weight_decay"]) == ("adam", 0.01, 1e-4)
    assert not m["fix_eps_pairing"] and m["teacher_closer_guard"]
    one = name == C1T2S
    assert m["name"] == ("switokd_1t2s" if one else "switokd_2t1s")
    assert d["model"]["members"] == (["wrn16_10_switokd", "wrn16_2_switokd", "mobilenetv1"] if one
                                     else ["wrn16_2_switokd", "wrn16_10_switokd", "mobilenetv1"])  # fmt: skip
    small = load_config(name, ["model.members=[resnet20,resnet20,resnet20]"])  # only the optimizers matter
    plan = build_optimization(build_method(small, 100), small)
    used = []
    for _ in range(269):
        used.append([o.param_groups[0]["lr"] for o in plan.optimizers])
        plan.end_of_epoch()
    for net, base in enumerate((0.1, 0.1, 0.01)):
        want, lr = [], base
        for epoch in range(1, 270):
            lr = lr * 0.1 if epoch in (140, 200, 250) else lr
            want.append(lr)
        assert [u[net] for u in used] == pytest.approx(want, rel=1e-12)
    assert isinstance(plan.optimizers[2], torch.optim.Adam)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.last_optimizer=sgdw"], "method.last_optimizer must be 'adam' or 'sgd'"),
        (["method.last_lr=0"], "method.last_lr must be a positive lr"),
        (["method.last_weight_decay=-1"], "method.last_weight_decay must be >= 0"),
        (["model.members=[resnet20,resnet20]"], "model.members lists 2 networks, but switokd_1t2s builds 3"),
    ],
)
def test_bad_settings_fail_at_config_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["method.name=switokd_1t2s", *overrides])


def test_heads_deployment_and_members():
    cfg = load_config(None, ["method.name=switokd_2t1s", "model.members=[wrn16_2,resnet20,resnet32]",
                             "data.dataset=cifar10"])  # fmt: skip
    method = build_method(cfg, 10).eval()
    assert method.head_networks() == {"teacher1": "wrn16_2", "teacher2": "resnet20", "student": "resnet32"}
    assert method.deployed_member == 2 and method.deploy_head == "student"
    x = torch.randn(2, 3, 32, 32)
    outputs = method.eval_outputs(x)
    assert set(outputs) == {"teacher1", "teacher2", "student"}
    torch.testing.assert_close(method.deployable()(x), outputs["student"])


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.parametrize("name", [C1T2S, C2T1S])
def test_trains_logs_resumes_exactly_and_deploys_the_last_member(cifar10_root, tmp_path, name):
    """Three small networks on the CIFAR-10 subset, two epochs straight and one then resumed: the same weights,
    all three optimizers' state (Adam's included) and the same metrics bitwise; deploy.pt holds the last member."""
    settings = {
        "data.dataset": "cifar10",
        "data.mean": "[0.491,0.482,0.447]",
        "data.std": "[0.247,0.243,0.262]",
        "model.members": "[resnet20,wrn16_1_switokd,resnet20]",
        "data.limit_train": 96,
        "data.limit_test": 50,
        "data.batch_size": 32,
        "train.max_steps_per_epoch": 2,
    }
    full, resumed = helpers.train_and_resume(
        name, lambda run, epochs: helpers.quick_overrides(cifar10_root, tmp_path, run, epochs, settings)
    )
    a, b = helpers.assert_same_runs(full, resumed)
    helpers.assert_same(a["optimizers"], b["optimizers"], "optimizers")
    rows = read_metrics_csv(full / "metrics.csv")
    method = "switokd_1t2s" if name == C1T2S else "switokd_2t1s"
    heads = METHODS.get(method).HEADS
    for p in ("pair1", "pair2"):
        assert f"train/stat/{p}_expert" in rows[-1] and f"train/stat/{p}_delta" in rows[-1]
    assert {f"test/{h}/top1" for h in heads} <= set(rows[-1])
    assert rows[0][f"lr/{heads[2]}"] == pytest.approx(0.01) and rows[0][f"lr/{heads[0]}"] == pytest.approx(0.1)
    info = read_deploy(full / "deploy.pt")
    assert (info["model"], info["method"]) == ("resnet20", method)
