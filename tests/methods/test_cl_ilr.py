"""CL-ILR (``docs/methods.md``, ``cl_ilr``): the mean-of-the-others targets, the ILR gradient scaling of the
shared trunk and the detach switch (its loss dict against the reference: ``test_shared.py``)."""

from __future__ import annotations

import torch
from method_helpers import (
    batch,
    branch_outputs,
    close,
    grads_of,
    make,
    ramp,
    ref_kl,
    some_grad_in,
    summed,
)

from okd.methods import cl_ilr


# ------------------------------------------------------------------------------- tiny-tensor equations
def test_cl_targets_are_the_mean_of_the_other_branches():
    z = [torch.full((1, 2), v) for v in (1.0, 2.0, 6.0)]
    close(cl_ilr.mean_of_others(z, 0), torch.full((1, 2), 4.0))
    close(cl_ilr.mean_of_others(z, 2), torch.full((1, 2), 1.5))
    zs = [torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])]
    T = 2.0
    target = cl_ilr.mean_of_other_probs_as_logits(zs, 2, T)
    expected = (torch.softmax(zs[0] / T, 1) + torch.softmax(zs[1] / T, 1)) / 2
    close(torch.softmax(target / T, 1), expected)


def test_grad_scale_is_identity_forward_and_scaled_backward():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = cl_ilr.grad_scale(x, 0.25)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([4.0, 8.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0]))


def test_cl_ilr_mean_probs_target_is_the_mean_of_the_other_branches_softened_probabilities():
    """``target=mean_probs``: branch i's KL target is (1/(m-1)) sum_{j != i} softmax(z_j / T), not the logit mean."""
    m = make("cl_ilr", target="mean_probs")
    x, y = batch()
    _, _, z = branch_outputs(m, x)
    losses = m.training_step(x, y, 40)
    for i, zi in enumerate(z):
        q = sum(torch.softmax(zj / 3.0, 1) for j, zj in enumerate(z) if j != i) / 3
        close(losses[f"branch{i}/kl"], ramp(40) * ref_kl(zi, 3.0 * q.log(), 3.0, 1e-7))
    logit_mean = make("cl_ilr").training_step(x, y, 40)
    assert abs(losses["branch0/kl"].item() - logit_mean["branch0/kl"].item()) > 1e-4


# --------------------------------------------------------------------------------------- gradient flow
def test_cl_ilr_trunk_gradient_is_exactly_one_mth():
    x, y = batch()
    grads = {}
    for rescale in (True, False):
        m = make("cl_ilr", seed=3, grad_rescale=rescale)
        summed(m.training_step(x, y, 80)).backward()
        grads[rescale] = (grads_of(m.net.shared), grads_of(m.net.branches))
    for scaled, plain in zip(grads[True][0], grads[False][0], strict=True):
        assert torch.equal(scaled * 4, plain)
    for scaled, plain in zip(grads[True][1], grads[False][1], strict=True):
        assert torch.equal(scaled, plain)


def test_cl_ilr_targets_detach_switch():
    x, y = batch()
    for detach, expect in ((False, True), (True, False)):
        m = make("cl_ilr", detach_targets=detach)
        summed(m.training_step(x, y, 80), lambda k: k == "branch0/kl").backward()
        assert some_grad_in(m.net.branches[1]) is expect
