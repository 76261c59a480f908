"""The generator states a checkpoint keeps (okd/engine/seeding.py): saved and restored exactly, CUDA's only where a
GPU is present and the checkpoint has them."""

from __future__ import annotations

import random

import numpy as np
import torch

from okd.engine import seeding
from okd.engine.seeding import restore_rng_state, rng_state


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_a_restored_state_repeats_the_python_numpy_and_torch_draws():
    state = rng_state()
    first = draws()
    restore_rng_state(state)
    assert draws() == first


def test_cuda_states_are_restored_only_when_saved_and_a_gpu_is_present(monkeypatch):
    restored = []
    monkeypatch.setattr(seeding.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(seeding.torch.cuda, "set_rng_state_all", restored.append)
    monkeypatch.setattr(seeding.torch.cuda, "get_rng_state_all", lambda: [torch.tensor([7], dtype=torch.uint8)])
    saved = rng_state()
    assert [t.tolist() for t in saved["cuda"]] == [[7]]
    cpu_only = {k: v for k, v in saved.items() if k != "cuda"}  # a checkpoint written on a machine without a GPU
    restore_rng_state(cpu_only)
    assert restored == []
    restore_rng_state(saved)
    assert restored == [saved["cuda"]]
    monkeypatch.setattr(seeding.torch.cuda, "is_available", lambda: False)
    restore_rng_state(saved)  # a GPU checkpoint read on the CPU: the CUDA states wait unused
    assert len(restored) == 1


def test_seed_everything_seeds_python_numpy_and_torch():
    """One seed fixes all three generators: draws after it repeat, and another seed gives other draws of each."""
    seeding.seed_everything(5)
    first = draws()
    seeding.seed_everything(5)
    assert draws() == first
    seeding.seed_everything(6)
    assert all(a != b for a, b in zip(draws(), first, strict=True))


def test_a_seed_past_numpys_range_seeds_numpy_modulo_2_to_the_32():
    """numpy takes seeds below 2**32: a larger one seeds it with its remainder (python and torch take it whole)."""
    seeding.seed_everything(5)
    small = float(np.random.rand())
    seeding.seed_everything(2**32 + 5)
    assert float(np.random.rand()) == small
