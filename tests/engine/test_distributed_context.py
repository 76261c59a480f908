"""The process facts of okd/engine/distributed.py in one process: the context from the environment, each rank's
device, the global batch's per-rank share, and the collectives' one-process identities."""

from __future__ import annotations

import pytest
import torch

from okd.engine import distributed
from okd.engine.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    check_global_batch,
    init_distributed,
    rank_device,
    shutdown,
)
from okd.errors import ConfigError


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed("cpu")
    assert ctx == DistContext() and not ctx.enabled and ctx.is_main
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("cuda") == DistContext()
    assert DistContext(rank=1, world_size=2).enabled and not DistContext(rank=1, world_size=2).is_main


def test_a_torchrun_process_joins_with_gloo_on_the_cpu_and_nccl_on_its_gpu(monkeypatch):
    """WORLD_SIZE > 1: the context comes from RANK/LOCAL_RANK; a GPU run selects cuda:LOCAL_RANK and NCCL."""
    joined, selected = [], []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", selected.append)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: joined.append(backend))
    assert init_distributed("cpu") == DistContext(rank=3, world_size=4, local_rank=1)
    assert (joined, selected) == (["gloo"], [])
    assert init_distributed("cuda") == DistContext(rank=3, world_size=4, local_rank=1)
    assert (joined, selected) == (["gloo", "nccl"], [1])


def test_each_rank_drives_the_gpu_of_its_local_rank():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert rank_device(DistContext(rank=3, world_size=4, local_rank=1), cuda) == torch.device("cuda", 1)
    assert rank_device(DistContext(), cuda) == cuda  # one process keeps the device it was given
    assert rank_device(DistContext(rank=1, world_size=2, local_rank=1), cpu) == cpu


def test_the_global_batch_is_shared_evenly_or_refused_with_a_multiple():
    assert check_global_batch(64, DistContext()) == 64
    assert check_global_batch(64, DistContext(rank=0, world_size=4)) == 16
    with pytest.raises(ConfigError, match=r"data.batch_size=10 is the global batch .* 4 processes; choose a multiple"):
        check_global_batch(10, DistContext(rank=0, world_size=4))


def test_collectives_of_one_process_are_identities():
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t, DistContext()) is t and t.tolist() == [1.0, 2.0]
    assert all_gather_objects({"a": 1}, DistContext()) == [{"a": 1}]
    barrier(DistContext())
    shutdown(DistContext())
