"""ONE (``docs/methods.md``, ``one``): the gated teacher, the ramped KL weight, the gate's BatchNorm and its gradient
flow (its loss dict against the reference: ``test_shared.py``)."""

from __future__ import annotations

import helpers
import pytest
import torch
from method_helpers import (
    batch,
    close,
    make,
    one_ref,
    ramp,
    some_grad_in,
    summed,
)

from okd.methods import one


# ------------------------------------------------------------------------------- tiny-tensor equations
def test_one_gated_teacher_is_the_gate_weighted_logit_sum():
    z = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])]
    g = torch.tensor([[0.25, 0.75]])
    close(one.gated_logits(z, g), torch.tensor([[0.25 * 1 + 0.75 * 3, 0.25 * 2 - 0.75]]))


def test_one_kl_weight_scales_the_ramped_kl():
    m = make("one", kl_weight=0.4)
    m.train()
    x, y = batch()
    epoch = 40
    losses = m.training_step(x, y, epoch)
    ref, _, _ = one_ref(m, x, y, epoch)
    assert losses["stat/kl_weight"].item() == pytest.approx(0.4 * ramp(epoch), rel=1e-6)
    for i in range(4):
        close(losses[f"branch{i}/kl"], 0.4 * ref[f"branch{i}/kl"])
        close(losses[f"branch{i}/ce"], ref[f"branch{i}/ce"])
    close(losses["teacher/ce"], ref["teacher/ce"])


def test_one_losses_compute_the_ramped_kl_weight_when_the_caller_gives_none():
    """``one_losses`` without ``w`` weights the KLs with ``kl_weight * w(epoch)``, as if the caller had given it."""
    m = make("one", kl_weight=0.4)
    x, y = batch()
    out, gate = m.forward_one(x)
    losses = one.one_losses(out, gate, y, m.hp, 40)
    given = one.one_losses(out, gate, y, m.hp, 40, w=0.4 * ramp(40))
    assert losses["stat/kl_weight"].item() == pytest.approx(0.4 * ramp(40), rel=1e-6)
    assert losses.keys() == given.keys()
    for key, value in losses.items():
        close(value, given[key])


def test_one_gate_batchnorm_uses_momentum_0_1():
    gate = one.Gate(16, 4)
    assert helpers.assert_bn_updates_with_momentum_0_1(gate, torch.randn(8, 16, 4, 4)) == 1


# --------------------------------------------------------------------------------------- gradient flow
def test_one_gate_learns_from_the_kl_only_when_not_detached():
    x, y = batch()
    for detach, expect in ((False, True), (True, False)):
        m = make("one", detach_teacher=detach)
        losses = m.training_step(x, y, 80)
        summed(losses, lambda k: k.endswith("/kl")).backward(retain_graph=True)
        assert some_grad_in(m.gate) is expect
        # through the non-detached teacher, branch 1's KL also reaches branch 0
        m.zero_grad(set_to_none=True)
        losses["branch1/kl"].backward(retain_graph=True)
        assert some_grad_in(m.net.branches[0]) is expect
        m.zero_grad(set_to_none=True)
        losses["teacher/ce"].backward()
        assert some_grad_in(m.gate)
