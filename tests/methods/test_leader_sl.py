"""The leader strategy of ``dml_sl`` and ``one_sl`` (``docs/methods.md``, ``dml_sl``, ``one_sl``): the leader and the
fusion module never send gradient to the peers (their loss dicts against the reference: ``test_shared.py``)."""

from __future__ import annotations

import pytest
from method_helpers import (
    K,
    batch,
    close,
    make,
    no_grad_in,
    some_grad_in,
    summed,
)
from torch import nn

from okd.errors import ConfigError
from okd.methods.leader_sl import LeaderStrategy, fusion_weight


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


# ------------------------------------------------------------------------------------- the leader strategy
def test_leader_strategy_refuses_a_leader_whose_last_map_differs_from_the_peers():
    with pytest.raises(ConfigError, match=r"^resnet20: the leader's last map has 64 channels, the peers' 32$"):
        LeaderStrategy("resnet20", K, 32, 2, decoder=True)


def test_leader_strategy_losses_compute_the_fused_map_weight_when_the_caller_gives_none():
    """Without ``lam`` the fused-map and decoder terms take ``fusion_weight(hp, epoch)`` (epoch 3: still warming up)."""
    m = make("dml_sl")
    x, y = batch()
    logits, maps = m._peers(x)
    losses = m.sl.losses(x, maps, logits, y, 3, m.hp)
    given = m.sl.losses(x, maps, logits, y, 3, m.hp, lam=fusion_weight(m.hp, 3))
    assert fusion_weight(m.hp, 3) != fusion_weight(m.hp, 4)
    assert losses.keys() == given.keys() >= {"leader/fused_map", "leader/decoder"}
    for key, value in losses.items():
        close(value, given[key])
