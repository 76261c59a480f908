"""FFL (``docs/methods.md``, ``ffl``): where the fusion loss sends its gradient (its loss dict against the reference,
its heads and param groups: ``test_shared.py``)."""

from __future__ import annotations

from method_helpers import (
    batch,
    make,
    no_grad_in,
    some_grad_in,
    summed,
)

from okd.methods.build import load_config


# --------------------------------------------------------------------------------------- gradient flow
def test_ffl_fusion_loss_reaches_the_branches_unless_detached():
    x, y = batch()
    for detach, expect in ((False, True), (True, False)):
        m = make("ffl", detach_fusion_input=detach)
        losses = m.training_step(x, y, 80)
        losses["fusion/ce"].backward(retain_graph=True)
        assert some_grad_in(m.net.branches[0]) is expect and some_grad_in(m.net.shared) is expect
        assert some_grad_in(m.fusion)
        m.zero_grad(set_to_none=True)
        summed(losses, lambda k: k.startswith("branch")).backward()
        assert no_grad_in(m.fusion)  # z_f is a detached target of the branch KLs


def test_ffl_accepts_a_fusion_weight_decay_of_zero():
    """0 switches the fusion module's weight decay off; only a negative value is refused (``test_shared.py``)."""
    cfg = load_config(None, ["method.name=ffl", "method.fusion_weight_decay=0"])
    assert cfg.method_params.fusion_weight_decay == 0
