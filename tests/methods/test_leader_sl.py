"""The leader strategy of ``dml_sl`` and ``one_sl`` (``docs/methods.md``, ``dml_sl``, ``one_sl``): the leader and the
fusion module never send gradient to the peers (their loss dicts against the reference: ``test_shared.py``)."""

from __future__ import annotations

import pytest
from method_helpers import (
    batch,
    make,
    no_grad_in,
    some_grad_in,
    summed,
)
from torch import nn


# --------------------------------------------------------------------------------------- gradient flow
@pytest.mark.parametrize("name", ["dml_sl", "one_sl"])
def test_leader_strategy_does_not_touch_the_peers(name):
    x, y = batch()
    m = make(name)
    losses = m.training_step(x, y, 10)
    summed(losses, lambda k: k.split("/")[0] in ("leader", "fusion")).backward(retain_graph=True)
    peers = m.nets if name == "dml_sl" else nn.ModuleList([m.net, m.gate])
    assert no_grad_in(peers) and some_grad_in(m.sl.leader) and some_grad_in(m.sl.fusion)
    m.zero_grad(set_to_none=True)
    summed(losses, lambda k: k.startswith("leader/")).backward(retain_graph=True)
    assert no_grad_in(m.sl.fusion)  # z_F and Phi are detached targets
    m.zero_grad(set_to_none=True)
    summed(losses, lambda k: k.startswith("fusion/")).backward()
    assert no_grad_in(m.sl.leader)
