"""Two L-MCL steps under DistributedDataParallel, for ``tests/engine/test_distributed.py``.

``torchrun --nproc_per_node=2 tests/lmcl_ddp_worker.py OUT``: for each ``meta_every`` of :data:`META_EVERY`, each
process takes two steps (batches 0 and 1 of epoch 0: with ``meta_every=50`` a meta round follows the first) on its
shard of fixed float64 batches through :class:`~okd.engine.step.StepRunner`'s DDP wrapper (gloo, CPU) and saves its
parameters to ``OUT/meta<meta_every>_rank<r>.pt``. The test builds the same methods and batches with :func:`build`
and :func:`batch` for its one-process reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import okd.methods  # noqa: F401  (registers every method)
from okd.config import Config
from okd.engine.builder import build_optimization
from okd.engine.distributed import DistContext
from okd.engine.step import StepRunner
from okd.methods.base import Method
from okd.methods.build import build_method, load_config

#: each process's share of the batch: whole classes, as the class-balanced sampler deals them
SHARDS = (slice(0, 8), slice(8, 16))
#: a meta round after batch 0 (the default, every 50 batches); none (phi fixed, a plain DDP step)
META_EVERY = (50, 0)


def build(meta_every: int) -> tuple[Method, list[torch.optim.Optimizer], Config]:
    """Two ResNet-20 L-MCL networks for 8 classes in float64 (the same weights in every process), their optimizers."""
    overrides = ["model.name=resnet20", "train.device=cpu", f"method.meta_every={meta_every}"]
    cfg = load_config("cifar100/lmcl_resnet32", overrides)
    torch.manual_seed(0)
    method = build_method(cfg, 8).double()
    return method, build_optimization(method, cfg).optimizers, cfg


def batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16 images of 16 x 16 pixels, two of each of 8 classes (every shard holds both images of its classes)."""
    g = torch.Generator().manual_seed(1 + index)
    return torch.randn(16, 3, 16, 16, generator=g, dtype=torch.float64), torch.arange(8).repeat_interleave(2)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for meta_every in META_EVERY:
        method, optimizers, cfg = build(meta_every)
        runner = StepRunner(method, optimizers, cfg.run.train, torch.device("cpu"))
        runner.wrap_distributed(DistContext(rank=rank, world_size=world), cfg.run.train)
        assert isinstance(runner.model, DistributedDataParallel)
        for index in range(2):
            images, labels = batch(index)
            runner.step(images[SHARDS[rank]], labels[SHARDS[rank]], 0)
        params = {n: p.detach() for n, p in method.named_parameters()}
        torch.save(params, out / f"meta{meta_every}_rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
