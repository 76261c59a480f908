"""torchrun / DistributedDataParallel support: process group, rank facts and metric reduction.

Launch with ``torchrun --nproc_per_node=N -m okd train CONFIG`` (add ``--nnodes``/``--rdzv_*`` for several
nodes). ``data.batch_size`` is the *global* batch: each rank processes ``batch_size / world_size`` images
of every global batch, so a run's optimisation is the same whatever the number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from okd.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistContext:
    """Join the process group that torchrun describes in the environment (a no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank)


def rank_device(ctx: DistContext, device: torch.device) -> torch.device:
    """Each rank drives its own GPU (cuda:LOCAL_RANK)."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def check_global_batch(batch_size: int, ctx: DistContext) -> int:
    """The per-rank share of the global batch; it must divide evenly."""
    if batch_size % ctx.world_size:
        raise ConfigError(
            f"data.batch_size={batch_size} is the global batch and must be divisible by the "
            f"{ctx.world_size} processes; choose a multiple of {ctx.world_size}"
        )
    return batch_size // ctx.world_size


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj, ctx: DistContext) -> list:
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
