"""Seeds, RNG state capture/restore and deterministic mode.

The captured state holds only tensors, ints, floats and tuples/lists of them, so a checkpoint that carries it
loads with ``torch.load(weights_only=True)`` (numpy's key array is stored as an int64 tensor).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Ask PyTorch for deterministic kernels (bitwise repeatable runs on CPU; best effort on GPU)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled and torch.cuda.is_available()


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(state: dict) -> None:
    keys = np.asarray(state["keys"].numpy(), dtype=np.uint32)
    np.random.set_state(
        (state["bit_generator"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))
    )


def rng_state() -> dict:
    """The Python, numpy, torch (and CUDA) generator states, in types ``weights_only`` loading accepts."""
    version, internal, gauss = random.getstate()
    state = {
        "python": (int(version), tuple(int(x) for x in internal), gauss if gauss is None else float(gauss)),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
