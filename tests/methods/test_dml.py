"""DML (``docs/methods.md``, ``dml``): the KL terms against their equations, the detach switch, one backward of the
summed dict against per-net backwards, and the alternating updates (the DML paper's algorithm) through the
manual-step contract (its loss dict against the reference: ``test_shared.py``)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import helpers
import pytest
import torch
import torch.nn.functional as F
from method_helpers import batch, close, grads_of, make, no_grad_in, ref_ce, ref_kl, some_grad_in, summed

from okd.config import OptimConfig, TrainConfig
from okd.engine.builder import build_optimization
from okd.engine.distributed import DistContext
from okd.engine.step import StepRunner
from okd.errors import ConfigError
from okd.methods import dml
from okd.methods.base import MethodContext
from okd.methods.build import load_config
from okd.methods.dml import DML, DMLParams

CONFIG = "cifar100/dml_resnet32"


# ------------------------------------------------------------------------------- tiny-tensor equations
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


# --------------------------------------------------------------------------------------- gradient flow
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


# --------------------------------------------------------------------------------- alternating updates
def make_dml(**params) -> DML:
    torch.manual_seed(0)
    hp = DMLParams(alternate_updates=True, **params)
    hp.validate()
    return DML(MethodContext(model="resnet20", num_classes=10, optim=OptimConfig(), params=hp, epochs=1))


def reference_alternating(nets, images, labels, T: float, recompute: bool, kl_weight: float = 1.0) -> None:
    """Plain-PyTorch DML steps: net i against the peers' predictions, recomputed after each step (or not)."""
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4) for n in nets]
    with torch.no_grad():
        frozen = [n(images) for n in nets] if not recompute else None
    for i, (net, opt) in enumerate(zip(nets, opts, strict=True)):
        with torch.no_grad():
            peers = (
                [n(images) for j, n in enumerate(nets) if j != i]
                if recompute
                else [z for j, z in enumerate(frozen) if j != i]
            )
        z = net(images)
        kl = kl_weight * sum(helpers.ref_kl(z, p, T) for p in peers) / len(peers)
        opt.zero_grad()
        (F.cross_entropy(z, labels) + kl).backward()
        opt.step()


@pytest.mark.parametrize("T, kl_weight", [(3.0, 1.0), (2.0, 0.3)])
def test_each_net_steps_against_the_peers_current_predictions(T, kl_weight):
    method = make_dml(temperature=T, kl_weight=kl_weight)
    reference = copy.deepcopy(list(method.nets))
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    cfg = load_config(CONFIG, ["model.name=resnet20", "data.dataset=cifar10", "method.alternate_updates=true"])
    plan = build_optimization(method, cfg)
    runner = StepRunner(method, plan.optimizers, TrainConfig(channels_last=False), torch.device("cpu"))
    losses, total = runner.step(images, labels, 0)
    assert set(losses) == {"net0/ce", "net0/kl", "net1/ce", "net1/kl"}
    assert all(not v.requires_grad for v in losses.values())

    stale = copy.deepcopy(reference)
    reference_alternating(reference, images, labels, T, recompute=True, kl_weight=kl_weight)
    reference_alternating(stale, images, labels, T, recompute=False, kl_weight=kl_weight)
    for got, want in zip(method.nets, reference, strict=True):
        for (name, p), q in zip(got.state_dict().items(), want.state_dict().values(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # net 1 really used net 0's updated predictions: without recomputation its weights differ
    assert not torch.allclose(method.nets[1].fc.weight, stale[1].fc.weight, atol=1e-7)


def test_alternating_updates_build_no_graph_through_the_peers(monkeypatch):
    """The peers' predictions are computed without autograd: only net i's own forward holds a graph."""
    method = make_dml(num_nets=3)
    seen = []
    real = dml.dml_kl

    def spy(logits, i, hp):
        seen.append([z.requires_grad for z in logits])
        return real(logits, i, hp)

    monkeypatch.setattr(dml, "dml_kl", spy)
    runner = SimpleNamespace(
        zero_grad=lambda i: None, backward=lambda loss: loss.backward(), step_optimizer=lambda i: None
    )
    method.manual_step(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), 0, runner)
    assert seen == [[True, False, False], [False, True, False], [False, False, True]]


def test_alternating_updates_need_detached_targets_and_one_process():
    with pytest.raises(ConfigError, match="detach_targets"):
        DMLParams(alternate_updates=True, detach_targets=False).validate()
    method = make_dml()
    runner = StepRunner(method, [], TrainConfig(), torch.device("cpu"))
    with pytest.raises(ConfigError, match="one process"):
        runner.wrap_distributed(DistContext(rank=0, world_size=2), TrainConfig())


@pytest.mark.slow
def test_alternating_dml_trains_and_resumes_exactly(cifar10_root, tmp_path):
    settings = {
        "model.name": "resnet20",
        "data.dataset": "cifar10",
        "method.alternate_updates": "true",
        "data.limit_train": 96,
        "data.limit_test": 50,
        "data.batch_size": 32,
        "train.max_steps_per_epoch": 2,
    }
    full, resumed = helpers.train_and_resume(
        CONFIG, lambda name, epochs: helpers.quick_overrides(cifar10_root, tmp_path, name, epochs, settings)
    )
    helpers.assert_same_runs(full, resumed)
