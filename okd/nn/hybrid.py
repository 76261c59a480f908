"""Parameter hybridization (OKDPH): mixing the state of equal networks into one, and pulling a network towards it.

Both act key by key on whole ``state_dict`` entries, so the networks must share one architecture. Integer
entries (BatchNorm's ``num_batches_tracked``) are mixed in floating point and written back truncated, as
``load_state_dict`` does when it copies a float tensor into an integer buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _entries(module: nn.Module, buffers: bool) -> dict[str, Tensor]:
    """The detached ``state_dict`` entries of ``module``: parameters, and its buffers when ``buffers``."""
    state = module.state_dict(keep_vars=False)
    if buffers:
        return state
    names = {name for name, _ in module.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


def check_same_layout(modules: list[nn.Module]) -> None:
    """Raise ``ValueError`` unless every module has the keys and shapes of the first (mixing is key by key)."""
    first = {k: tuple(v.shape) for k, v in modules[0].state_dict().items()}
    for i, module in enumerate(modules[1:], start=1):
        other = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        if other != first:
            diff = sorted(set(first.items()) ^ set(other.items()))[:3]
            raise ValueError(
                f"network {i} differs from network 0 in its state_dict (e.g. {diff}); mixing needs equal nets"
            )


@torch.no_grad()
def mix_into(target: nn.Module, sources: list[nn.Module], weights: list[float], buffers: bool = True) -> None:
    """theta_target <- sum_j w_j theta_j, entry by entry (parameters, and buffers when ``buffers``).

    The sum runs in the order w_0 theta_0, then w_j theta_j + (the sum so far), without gradient."""
    states = [_entries(s, buffers) for s in sources]
    out = _entries(target, buffers)
    for key, dest in out.items():
        acc = states[0][key] * weights[0]
        for state, w in zip(states[1:], weights[1:], strict=True):
            acc = state[key] * w + acc
        dest.copy_(acc)


def mixed_parameters(sources: list[nn.Module], weights: list[float | Tensor]) -> dict[str, Tensor]:
    """sum_j w_j theta_j of the parameters as differentiable functions of the sources' live parameters (the paper's
    reading of the hybrid model: its loss reaches student j scaled by w_j)."""
    params = [dict(s.named_parameters()) for s in sources]
    out = {}
    for key in params[0]:
        acc = params[0][key] * weights[0]
        for p, w in zip(params[1:], weights[1:], strict=True):
            acc = p[key] * w + acc
        out[key] = acc
    return out


@torch.no_grad()
def fuse_into(net: nn.Module, hybrid: nn.Module, gamma: float, buffers: bool = True) -> None:
    """theta <- gamma theta_H + (1 - gamma) theta, entry by entry; gamma = 1 copies H, gamma = 0 changes nothing.

    The optimizer state (momentum) is not touched."""
    if gamma == 0:
        return
    mine, theirs = _entries(net, buffers), _entries(hybrid, buffers)
    for key, dest in mine.items():
        src = theirs[key]
        dest.copy_(src if gamma == 1 else src * gamma + dest * (1.0 - gamma))
