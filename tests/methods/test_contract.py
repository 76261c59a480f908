"""The method contract (``docs/add-a-method.md``), checked for every registered method.

Each entry of ``METHODS`` is built the way ``okd train`` builds it (``load_config`` + ``build_method``) on a small
backbone, from its defaults plus, where it needs more (KD's teacher), its row of ``SETUP``. A method that cannot be
built from its defaults and has no row fails here: it is not skipped. Then:

- ``build_optimization`` builds its optimizers (it refuses a trainable parameter in two groups or in none), and
  every trainable parameter is in exactly one optimizer;
- one ``StepRunner`` step on a CIFAR-sized batch (``views_for`` views) gives finite losses named
  ``<component>/<term>`` and changes the trained parameters;
- ``eval_outputs`` gives named heads of ``num_classes`` logits, the ``deploy_head`` (or the first head) among them;
- ``deployable()`` is a network that scores exactly as the deploy head in eval mode;
- the ``deploy.pt`` written from it (``deploy_record``) reads back (``read_deploy`` + ``build_network``) into a
  network with the same logits.

The last tests break a method on purpose and check that the same helpers fail it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import RecordingDDP
from torch import Tensor, nn

from okd.config import Config, OptimConfig
from okd.engine.builder import build_optimization
from okd.engine.distributed import DistContext
from okd.engine.step import StepRunner
from okd.errors import ConfigError
from okd.methods import METHODS, Method, MethodContext, ParamGroup
from okd.methods.build import build_method, load_config, method_defaults
from okd.models import create_model
from okd.models.deploy_file import build_network, read_deploy
from okd.runs.records import deploy_record

K = 10
BATCH = 4
MODEL = "resnet20"
DEFAULTS = ["data.dataset=cifar10", f"model.name={MODEL}", "train.device=cpu", "train.channels_last=false"]
#: config overrides of the methods that need more than their defaults ({teacher}: a resnet20 checkpoint file)
SETUP: dict[str, list[str]] = {
    "kd": [f"method.teacher_model={MODEL}", "method.teacher_checkpoint={teacher}"],
}
#: methods whose loss needs every class of a batch twice (trained with data.sampler=m_per_class): labels 0, 0, 1, 1
PAIRED_LABELS = {"mcl", "lmcl"}
LOSS_KEY = re.compile(r"[A-Za-z0-9_]+/[A-Za-z0-9_]+")


def build(name: str, teacher: Path) -> tuple[Config, Method]:
    overrides = [item.format(teacher=teacher) for item in SETUP.get(name, [])]
    cfg = load_config(None, [f"method.name={name}", *DEFAULTS, *overrides])
    torch.manual_seed(0)
    return cfg, build_method(cfg, num_classes=K)


def inputs(method: Method, seed: int = 1) -> tuple[Tensor | list[Tensor], Tensor]:
    """A training batch: one tensor, or a list of ``views_for`` independently drawn views."""
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(BATCH, 3, 32, 32, generator=g) for _ in range(type(method).views_for(method.hp))]
    labels = torch.randint(0, K, (BATCH,), generator=g)
    if any(isinstance(method, METHODS.get(n)) for n in PAIRED_LABELS):
        labels = torch.arange(BATCH) // 2
    return (views[0] if len(views) == 1 else views), labels


def check_optimization(method: Method, cfg: Config):
    """The method's optimizers, built as the trainer builds them; every trainable parameter in exactly one."""
    plan = build_optimization(method, cfg)
    optimized = [id(p) for opt in plan.optimizers for group in opt.param_groups for p in group["params"]]
    assert len(optimized) == len(set(optimized)), "a parameter is in two optimizers"
    trainable = {id(p): n for n, p in method.named_parameters() if p.requires_grad}
    missing = [n for i, n in trainable.items() if i not in set(optimized)]
    assert not missing, f"trainable parameters in no optimizer: {missing[:5]}"
    assert set(optimized) <= set(trainable), "an optimizer holds a parameter the method does not train"
    return plan


def check_step(method: Method, cfg: Config, plan) -> dict[str, Tensor]:
    """One step through the trainer's StepRunner: finite losses named <component>/<term>; the weights move."""
    runner = StepRunner(method, plan.optimizers, cfg.run.train, torch.device("cpu"), schedulers=plan.step_schedulers)
    before = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    method.train()
    losses, total = runner.step(*inputs(method), 0)
    assert losses, "the step returned no losses"
    bad_keys = [k for k in losses if not isinstance(k, str) or not LOSS_KEY.fullmatch(k)]
    assert not bad_keys, f"loss keys must be named <component>/<term>: {bad_keys}"
    assert any(not k.startswith("stat/") for k in losses), "every loss is a stat/ entry: nothing is trained"
    trained_stats = sorted(k for k, v in losses.items() if k.startswith("stat/") and v.requires_grad)
    assert not trained_stats, f"stat/ entries are logged, never trained: detach them ({trained_stats})"
    if method.manual_optimization:  # the automatic step's total is backwarded by the runner, freeing its graph
        kept = sorted(k for k, v in losses.items() if v.requires_grad)
        assert not kept, f"manual_step's losses must be detached (a kept graph outlives the step): {kept}"
    values = {k: float(v.detach()) for k, v in losses.items()}
    assert all(math.isfinite(v) for v in values.values()), f"non-finite losses: {values}"
    assert math.isfinite(float(total.detach())), f"non-finite total {float(total)}"
    moved = [n for n, p in method.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved, "the step changed no trained parameter"
    return losses


def check_heads(method: Method, x: Tensor) -> tuple[dict[str, Tensor], str]:
    """``eval_outputs`` in eval mode: named heads of K logits; the deploy head (None: the first) among them."""
    method.eval()
    with torch.no_grad():
        heads = method.eval_outputs(x)
    assert heads and all(isinstance(k, str) and k for k in heads), f"heads must be named: {list(heads)}"
    for head, z in heads.items():
        assert tuple(z.shape) == (x.shape[0], K), f"head {head!r} gives shape {tuple(z.shape)}, not ({x.shape[0]}, {K})"
        assert torch.isfinite(z).all(), f"head {head!r} gives non-finite outputs"
    deploy_head = method.deploy_head or next(iter(heads))
    assert deploy_head in heads, f"deploy_head {deploy_head!r} is not one of the heads {sorted(heads)}"
    return heads, deploy_head


def check_deployable(method: Method, x: Tensor, expected: Tensor) -> nn.Module:
    """``deployable()`` is one network whose logits (eval mode) are the deploy head's."""
    net = method.deployable()
    assert isinstance(net, nn.Module) and not isinstance(net, Method), f"deployable() gave {type(net).__name__}"
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), expected, rtol=0, atol=1e-5, msg="deployable() vs the deploy head")
    return net


def check_deploy_file(cfg: Config, method: Method, x: Tensor, expected: Tensor, path: Path) -> None:
    """deploy.pt as the trainer writes it, read back the way every command reads it: the same network."""
    torch.save(deploy_record(cfg, method, epoch=1), path)
    info = read_deploy(path)
    assert (info["model"], info["num_classes"], info["method"]) == (cfg.run.model.name, K, cfg.method_name)
    with torch.no_grad():
        logits = build_network(info, path).eval()(x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5, msg="the network rebuilt from deploy.pt")


def check_contract(cfg: Config, method: Method, tmp_path: Path) -> None:
    """Every check above, in the order the trainer meets them (optimizers, a step, evaluation, deploy.pt)."""
    plan = check_optimization(method, cfg)
    check_step(method, cfg, plan)
    x = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    heads, deploy_head = check_heads(method, x)
    check_deployable(method, x, heads[deploy_head])
    check_deploy_file(cfg, method, x, heads[deploy_head], tmp_path / "deploy.pt")


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_keeps_the_contract(name, teacher_file, tmp_path):
    cfg, method = build(name, teacher_file)
    check_contract(cfg, method, tmp_path)


def test_setup_rows_name_registered_methods():
    assert set(SETUP) <= set(METHODS.names()), sorted(set(SETUP) - set(METHODS.names()))


# --------------------------------------------------------------------------- the contract fails broken methods
def deploys_a_fresh_network(method):
    return lambda: create_model(MODEL, K)  # a freshly initialised network, not the deploy head's


def leaves_a_group_out(method):
    groups = method.param_groups()
    return lambda: groups[:-1]


def returns_a_nonfinite_loss(method):
    step = method.training_step
    return lambda *args, **kwargs: {k: v * math.inf for k, v in step(*args, **kwargs).items()}


def keeps_the_graph(method):
    manual_step = method.manual_step

    def undetached(images, labels, epoch, runner):
        losses = manual_step(images, labels, epoch, runner)
        return {k: v if k.startswith("stat/") else v.detach().requires_grad_() * 1.0 for k, v in losses.items()}

    return undetached


def returns_an_unnamed_loss(method):
    step = method.training_step
    return lambda *args, **kwargs: {"loss": sum(step(*args, **kwargs).values())}


BROKEN = [
    pytest.param("deployable", deploys_a_fresh_network, "deployable\\(\\) vs the deploy head", id="deployable"),
    pytest.param("param_groups", leaves_a_group_out, "in no optimizer group", id="param_groups"),
    pytest.param("training_step", returns_a_nonfinite_loss, "non-finite losses", id="nonfinite_loss"),
    pytest.param("training_step", returns_an_unnamed_loss, "<component>/<term>", id="unnamed_loss"),
]


@pytest.mark.parametrize(("hook", "breaks", "message"), BROKEN)
def test_the_contract_fails_a_broken_method(hook, breaks, message, teacher_file, tmp_path, monkeypatch):
    """DML with one hook broken: the helpers of the contract test fail it, naming what is wrong."""
    cfg, method = build("dml", teacher_file)
    monkeypatch.setattr(method, hook, breaks(method))
    with pytest.raises((AssertionError, RuntimeError), match=message):
        check_contract(cfg, method, tmp_path)


def test_the_contract_fails_a_manual_step_that_returns_its_graph(teacher_file, tmp_path, monkeypatch):
    """SwitOKD (a manual step) returning undetached losses: in expert mode the teacher's loss is never
    backwarded, so its graph and activations would live on into the next step."""
    cfg, method = build("switokd", teacher_file)
    monkeypatch.setattr(method, "manual_step", keeps_the_graph(method))
    with pytest.raises(AssertionError, match="must be detached"):
        check_contract(cfg, method, tmp_path)


DISTILLATION_KNOBS = {"temperature": (0.0, "positive"), "kl_weight": (-1.0, ">= 0")}
DISTILLATION_KNOBS |= {"rampup_length": (-1, ">= 0"), "target_eps": (-1e-7, ">= 0")}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_distillation_knob_is_refused_by_its_own_name(name):
    """A bad temperature, KL weight, ramp-up length or target epsilon is refused naming that key (not another one
    the check was handed by mistake), in every method that has it."""
    fields = {f.name for f in dataclasses.fields(METHODS.get(name).Params)}
    setup = [item.format(teacher="t.pt") for item in SETUP.get(name, [])]
    checked = 0
    for key, (bad, rule) in DISTILLATION_KNOBS.items():
        if key not in fields:
            continue
        with pytest.raises(ConfigError, match=rf"^method\.{key} must be {re.escape(rule)}"):
            load_config(None, [f"method.name={name}", *setup, f"method.{key}={bad}"])
        checked += 1
    if "temperature" in fields:
        assert checked >= 1


#: the smallest cohort each method takes: (method, its size key, the minimum, other overrides)
SMALLEST = [
    ("one", "num_branches", 2, []), ("cl_ilr", "num_branches", 2, []), ("ffl", "num_branches", 2, []),
    ("pcl", "num_branches", 2, []), ("individual", "num_branches", 1, []), ("okddip", "num_branches", 2, []),
    ("okddip", "num_branches", 3, ["method.self_attention=false"]),  # a peer cannot attend to itself alone
    ("dml", "num_nets", 2, []), ("ffsd", "num_students", 2, []), ("kdcl", "num_students", 2, []),
    ("okdph", "num_students", 2, []),
]  # fmt: skip


@pytest.mark.parametrize(("name", "key", "smallest", "extra"), SMALLEST)
def test_the_smallest_cohort_is_accepted_and_one_less_refused(name, key, smallest, extra):
    load_config(None, [f"method.name={name}", *extra, f"method.{key}={smallest}"])
    with pytest.raises(ConfigError, match=rf"method\.{key} must be (an integer )?>= {smallest}, got {smallest - 1}"):
        load_config(None, [f"method.name={name}", *extra, f"method.{key}={smallest - 1}"])


def test_a_method_that_leaves_out_a_required_hook_fails_loudly_and_the_optional_ones_default():
    """A method built on ``Method`` without its required hooks raises NotImplementedError when the trainer calls one
    (never a silent None); the optional hooks answer their documented defaults."""
    ctx = MethodContext(model="resnet20", num_classes=10, optim=OptimConfig(), params=None, epochs=1)
    bare = type("Bare", (Method,), {})(ctx)
    x, y = torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    for call in (
        bare.param_groups,
        bare.deployable,
        lambda: bare.training_step(x, y, 0),
        lambda: bare.eval_outputs(x),
        lambda: bare.manual_step(x, y, 0, None),
        lambda: bare.distribute_networks(lambda m: m),
    ):
        with pytest.raises(NotImplementedError):
            call()
    assert bare.epoch_scalars(3) == {} and bare.oracle_groups() == {} and bare.derived_metrics({"a/top1": 1.0}) == {}
    assert bare.manual_optimization is False and bare.ddp_ignored_parameters() == []


def test_the_base_cohort_hooks_count_the_cohort_key_or_one_and_deploy_a_copy():
    """``cohort_size`` reads the ``cohort_key`` field (as an int) or answers one; ``deployed_member`` is None."""
    ctx = MethodContext(model="resnet20", num_classes=10, optim=OptimConfig(), params=None, epochs=1)
    bare = type("Bare", (Method,), {})
    counted = type("Counted", (Method,), {"cohort_key": "size"})
    assert bare.cohort_size(SimpleNamespace(size=5)) == 1
    assert counted.cohort_size(SimpleNamespace(size="3")) == 3
    assert bare(ctx).deployed_member is None


def test_a_context_hands_out_its_members_or_copies_and_refuses_a_wrong_count():
    ctx = MethodContext("resnet20", 10, OptimConfig(), None, 1)
    assert ctx.cohort(3) == ["resnet20"] * 3
    mixed = MethodContext("resnet20", 10, OptimConfig(), None, 1, members=["resnet20", "wrn16_2"])
    assert mixed.cohort(2) == ["resnet20", "wrn16_2"] and mixed.cohort(2) is not mixed.members
    with pytest.raises(ConfigError, match=r"^model\.members lists 2 networks, but the method builds 3$"):
        mixed.cohort(3)


@dataclasses.dataclass
class RequiredParams:
    depth: int


def test_method_defaults_of_a_method_whose_params_need_a_value_are_unknown(monkeypatch):
    """A registered method whose ``Params`` has a field without a default has no defaults to show: None."""
    monkeypatch.setitem(METHODS._entries, "needs_depth", type("NeedsDepth", (Method,), {"Params": RequiredParams}))
    assert method_defaults("needs_depth") is None
    assert method_defaults("dml")["num_nets"] == 2


def test_a_param_group_left_at_its_defaults_takes_the_default_recipes_optimizer():
    """``ParamGroup``'s defaults are ``OptimConfig``'s: an SGD group a user builds by hand trains like the recipe."""
    group, optim = ParamGroup("mine", []), OptimConfig()
    assert group.optimizer == "sgd" and group.schedule is None
    assert (group.lr, group.momentum, group.nesterov, group.weight_decay) == (
        optim.lr,
        optim.momentum,
        optim.nesterov,
        optim.weight_decay,
    )


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_is_accepted_under_ddp_with_every_trained_parameter_wrapped(
    name, teacher_file, monkeypatch
):
    """Each method in its default configuration goes through ``wrap_distributed``: one wrapper around the whole
    method, or (``ddp_per_network``) one per network; every trained parameter sits in a wrapper or is one the method
    averages itself (``ddp_ignored_parameters``)."""
    cfg, method = build(name, teacher_file)
    trained = {id(p) for p in method.parameters() if p.requires_grad}
    ignored = {id(p) for n, p in method.named_parameters() if n in set(method.ddp_ignored_parameters())}
    recording = RecordingDDP.install(monkeypatch)
    runner = StepRunner(method, [], cfg.run.train, torch.device("cpu"))
    runner.wrap_distributed(DistContext(rank=0, world_size=2), cfg.run.train)
    per_network = method.manual_optimization and method.ddp_per_network
    wrapped = [module for module, _, _ in recording.made]
    assert per_network or wrapped == [method]
    in_wrappers = {id(p) for module in wrapped for p in module.parameters()}
    assert not trained - in_wrappers - ignored, "trained parameters outside every DDP wrapper"


def test_a_context_gives_its_input_size_or_cifars_32_without_one():
    ctx = MethodContext(model="resnet20", num_classes=10, optim=OptimConfig(), params=None, epochs=1)
    assert ctx.input_size == 32
    ctx.extra["input_size"] = 64
    assert ctx.input_size == 64
    cfg = load_config(None, ["data.dataset=tinyimagenet", "model.name=resnet18"])
    assert build_method(cfg, 200).ctx.input_size == 64  # the config's image size reaches the method
