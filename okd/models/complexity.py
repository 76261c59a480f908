"""Parameter and multiply-accumulate (MAC) counts (``docs/models.md#counting-parameters-and-macs``).

MACs count Conv2d, ConvTranspose2d and Linear only, one multiply-add per weight use:
- Conv2d: output elements x (C_in / groups) x kh x kw;
- ConvTranspose2d: input elements x (C_out / groups) x kh x kw;
- Linear: rows x in_features x out_features.
BN, activations, pooling and additions are not counted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def count_parameters(model: nn.Module) -> int:
    """Total number of elements over all parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def _layer_macs(module: nn.Module, inp: Tensor, out: Tensor) -> int:
    if isinstance(module, nn.ConvTranspose2d):
        k = math.prod(module.kernel_size)
        return inp.numel() * (module.out_channels // module.groups) * k
    if isinstance(module, nn.Conv2d):
        k = math.prod(module.kernel_size)
        return out.numel() * (module.in_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


def count_macs(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """MACs per image of one forward pass on a zero input of shape ``input_size`` (N, C, H, W).

    Uses temporary forward hooks (always removed) and runs in eval mode under ``no_grad``;
    the model's train/eval flags are restored afterwards. The total is divided by N.
    """
    total = 0

    def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
        nonlocal total
        total += _layer_macs(module, args[0], out)

    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return total // input_size[0]
