"""Synchronising CUDA calls inside one okd step (``--check-syncs``)."""

from __future__ import annotations

import warnings

import torch

from okd.bench.env import sync_device
from okd.bench.timing import LivePath


def count_syncs(live: LivePath, device: torch.device) -> int | None:
    """Synchronising CUDA calls in one step (``torch.cuda.set_sync_debug_mode``); None off a GPU."""
    if device.type != "cuda":
        return None
    x, y = next(live.batches)
    sync_device(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            live.step(x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
