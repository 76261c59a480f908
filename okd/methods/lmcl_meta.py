"""L-MCL's meta round: the hypergradient of the loss-weight network phi (``docs/methods.md#lmcl``).

theta is every parameter of the networks and the Embed heads (not the aggregator, not phi), eta the current lr,
mu the momentum, lambda the weight decay. From theta_0 (the parameters after the main step), three virtual SGD
steps with plain momentum and a fresh buffer (v_0 = 0):

    v_t = mu v_{t-1} + g_t + lambda theta_{t-1},   theta_t = theta_{t-1} - eta v_t,

g_1, g_2 the gradients of the inner objective L_in(theta, phi) (the weighted contrastive terms, with the weights
computed *with* gradient from the current features) and g_3 that of the outer objective L_out (CE of every head).
Every parameter of theta takes part in every step (g = 0 where the objective does not use it, so it still decays).
The hypergradient of L_out(theta_3) is then swept back with the adjoints a_0 (of theta) and a_1 (of v):

    u = -eta a_0 + a_1;  phi.grad += (d g_t / d phi)^T u;  h = (d g_t / d theta)^T u;
    a_0 <- a_0 (1 - eta lambda) + c a_1 + h;  a_1 <- mu a_1 - eta mu a_0,

with c = 1 as the reference code writes it (``meta_adjoint_wd_bug=true``) or c = lambda, the exact adjoint. The
networks are left at theta_0 (everything here is functional; nothing is written into the parameters), and the
BatchNorm running statistics end as after one train-mode forward at theta_0 on the batch (the reference's
rollback-then-recompute side effect; ``meta_bn_side_effect=false`` restores them exactly instead).

Under DistributedDataParallel each process holds a shard of the batch and its own objectives on it; ``average``
(the mean over the processes) is applied to every g_t before its virtual step, to the adjoint a_0 of L_out(theta_3),
to every h and to phi's gradient. Every process then follows the same virtual trajectory and gets the same phi
gradient: the hypergradient, exactly, of the mean over the shards of L_out with the mean over the shards of L_in
(each shard's objective as one process computes it, its BatchNorm batch statistics and contrastive terms per shard).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

#: an objective of theta: (parameter list) -> scalar
Objective = Callable[[list[Tensor]], Tensor]
#: the mean over the processes of a list of tensors (the identity in one process)
Average = Callable[[list[Tensor]], list[Tensor]]


@dataclass
class MetaSettings:
    """The virtual optimiser's constants of one round."""

    lr: float
    momentum: float
    weight_decay: float
    inner_steps: int
    adjoint_wd_bug: bool


def _grads(loss: Tensor, inputs: list[Tensor], create_graph: bool = False) -> list[Tensor]:
    """d loss / d inputs, zeros for inputs the loss does not use."""
    grads = torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


def _leaves(theta: list[Tensor]) -> list[Tensor]:
    return [t.detach().requires_grad_(True) for t in theta]


def hypergradient(
    theta0: list[Tensor],
    phi: list[Tensor],
    inner: Objective,
    outer: Objective,
    cfg: MetaSettings,
    after_first_forward: Callable[[], None] | None = None,
    average: Average | None = None,
) -> tuple[list[Tensor], Tensor]:
    """(d L_out(theta_3) / d phi as the reverse sweep gives it, L_out(theta_3)).

    ``inner`` and ``outer`` compute the objectives at the given theta (``inner`` reads ``phi`` itself).
    ``after_first_forward`` runs right after the first inner forward at theta_0 (to record the BN statistics).
    ``average``: the mean over the processes (module docstring); None in one process.
    Each step's gradient graph is kept from the forward sweep for the reverse sweep (the reference recomputes it
    from a snapshot; the values are the same). The returned L_out(theta_3) is this process's.
    """
    mean = average if average is not None else (lambda xs: xs)
    eta, mu, wd = cfg.lr, cfg.momentum, cfg.weight_decay
    objectives = [inner] * cfg.inner_steps + [outer]
    theta = [t.detach() for t in theta0]
    velocity: list[Tensor] | None = None
    tape: list[tuple[list[Tensor], list[Tensor]]] = []  # (theta_{t-1} leaves, g_t with graph)
    for t, objective in enumerate(objectives):
        leaves = _leaves(theta)
        loss = objective(leaves)
        if t == 0 and after_first_forward is not None:
            after_first_forward()
        grads = _grads(loss, leaves, create_graph=True)
        tape.append((leaves, grads))
        with torch.no_grad():
            step = [g + wd * x for g, x in zip(mean([g.detach() for g in grads]), theta, strict=True)]
            velocity = step if velocity is None else [mu * v + s for v, s in zip(velocity, step, strict=True)]
            theta = [x - eta * v for x, v in zip(theta, velocity, strict=True)]
    leaves = _leaves(theta)
    outer_loss = outer(leaves)
    a0 = mean([g.detach() for g in _grads(outer_loss, leaves)])
    a1 = [torch.zeros_like(x) for x in a0]
    phi_grad = [torch.zeros_like(p) for p in phi]
    carry = 1.0 if cfg.adjoint_wd_bug else wd
    for leaves, grads in reversed(tape):
        u = [-eta * x + y for x, y in zip(a0, a1, strict=True)]
        dot = sum((g * v).sum() for g, v in zip(grads, u, strict=True))
        back = _grads(dot, [*phi, *leaves]) if dot.requires_grad else [torch.zeros_like(x) for x in (*phi, *leaves)]
        phi_grad = [acc + g.detach() for acc, g in zip(phi_grad, back[: len(phi)], strict=True)]
        h = mean([g.detach() for g in back[len(phi) :]])
        new_a0 = [x * (1 - eta * wd) + carry * y + z for x, y, z in zip(a0, a1, h, strict=True)]
        a1 = [mu * y - eta * mu * x for x, y in zip(a0, a1, strict=True)]
        a0 = new_a0
    return mean(phi_grad), outer_loss.detach()
