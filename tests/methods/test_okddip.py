"""OKDDip (``docs/methods.md``, ``okddip``): the peer attention on tiny tensors, the diversity statistic, the detach
switches and the self-attention option (its loss dict against the reference: ``test_shared.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from method_helpers import (
    batch,
    close,
    make,
    no_grad_in,
    some_grad_in,
    summed,
)

from okd.methods import okddip
from okd.methods.build import build_config


# ------------------------------------------------------------------------------- tiny-tensor equations
def test_okddip_attention_on_tiny_tensors():
    att = okddip.PeerAttention(2, 1)
    with torch.no_grad():
        att.query.weight.copy_(torch.tensor([[1.0, 0.0]]))
        att.key.weight.copy_(torch.tensor([[0.0, 1.0]]))
    h = [torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 1.0]])]  # q = (1, 2), k = (0, 1)
    alpha = att(h)[0]
    # e_ab = q_a k_b: row 0 = (0, 1), row 1 = (0, 2); softmax over b including b = a
    expected = torch.stack([torch.softmax(torch.tensor([0.0, 1.0]), 0), torch.softmax(torch.tensor([0.0, 2.0]), 0)])
    close(alpha, expected)
    z = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    close(okddip.attention_targets(att(h), z)[0], expected)  # one-hot logits pick the weights
    no_self = okddip.PeerAttention(2, 1, self_attention=False)
    close(no_self(h)[0], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_okddip_diversity_statistic():
    z = [torch.tensor([[0.0, 0.0]]), torch.tensor([[100.0, 0.0]]), torch.tensor([[0.0, 0.0]])]
    d = math.sqrt(0.5)  # |(1/2, 1/2) - (1, 0)|
    assert okddip.peer_diversity(z).item() == pytest.approx((d + 0 + d) / 3, rel=1e-5)


def test_okddip_diversity_of_a_single_peer_is_zero():
    """One peer has no pair to compare: the statistic is a float 0-d zero, not a division by zero pairs."""
    assert torch.equal(okddip.peer_diversity([torch.tensor([[1.0, 2.0]], dtype=torch.float64)]), torch.tensor(0.0))


# --------------------------------------------------------------------------------------- gradient flow
def test_okddip_projections_receive_gradient_unless_peer_targets_are_detached():
    x, y = batch()
    m = make("okddip")
    summed(m.training_step(x, y, 80)).backward()
    assert m.attention.query.weight.grad.abs().sum() > 0 and m.attention.key.weight.grad.abs().sum() > 0
    m = make("okddip", detach_peer_targets=True)
    summed(m.training_step(x, y, 80)).backward()
    assert no_grad_in(m.attention)


def test_okddip_leader_target_detach_switch():
    x, y = batch()
    for detach, expect in ((False, True), (True, False)):
        m = make("okddip", detach_leader_target=detach)
        m.training_step(x, y, 80)["leader/kl"].backward()
        assert some_grad_in(m.net.branches[0]) is expect
        assert some_grad_in(m.net.branches[3])


# ----------------------------------------------------------------------------------- config validation
def test_okddip_without_self_attention_needs_three_branches():
    build_config({"method": {"name": "okddip", "num_branches": 3, "self_attention": False}})
    build_config({"method": {"name": "okddip", "num_branches": 2}})  # with self-attention two suffice
    assert make("okddip", num_branches=3, self_attention=False).attention.self_attention is False
