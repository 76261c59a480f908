"""Two OKDPH steps with batch-level fusion under DistributedDataParallel, for ``tests/engine/test_distributed.py``.

``torchrun --nproc_per_node=2 tests/okdph_ddp_worker.py OUT``: for each setting of :data:`SETTINGS`, each process
builds the same float64 ResNet-20 students, reseeds torch's global generator per rank (as the trainer does), takes
two steps (batches 0 and 1, each student and H on its own view) on its shard through
:class:`~okd.engine.step.StepRunner`'s DDP wrapper (gloo, CPU), fusing after each, and saves its parameters
(students and H) to ``OUT/<name>_rank<r>.pt``. The test builds the same method and batches with :func:`build` and
:func:`batch` for its one-process reference.
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

#: each process's share of the batch (strided, as the sharded loader deals it)
SHARDS = (slice(0, None, 2), slice(1, None, 2))
#: name -> overrides: the release (mean mix, H's loss logged only); the paper's reading (a Dirichlet r per step,
#: drawn from each process's own stream, and H's loss through the mix)
SETTINGS = {
    "mean": ("method.hwm_mix=mean", "method.hwm_grad=none"),
    "dirichlet": ("method.hwm_mix=dirichlet", "method.hwm_grad=through_mix"),
}


def build(name: str) -> tuple[Method, list[torch.optim.Optimizer], Config]:
    """Two ResNet-20 OKDPH students for 8 classes in float64 (the same weights in every process), fused with H
    (gamma 0.5) after every step, and their optimizers."""
    overrides = ["model.name=resnet20", "train.device=cpu", "method.interval=1_batch", *SETTINGS[name]]
    cfg = load_config("cifar10/okdph_resnet32", overrides)
    torch.manual_seed(0)
    method = build_method(cfg, 8).double()
    return method, build_optimization(method, cfg).optimizers, cfg


def batch(index: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Three views (student 0, student 1, H) of 8 images of 16 x 16 pixels, and their labels."""
    g = torch.Generator().manual_seed(1 + index)
    views = [torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    return views, torch.randint(0, 8, (8,), generator=g)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in SETTINGS:
        method, optimizers, cfg = build(name)
        runner = StepRunner(method, optimizers, cfg.run.train, torch.device("cpu"))
        runner.wrap_distributed(DistContext(rank=rank, world_size=world), cfg.run.train)
        assert isinstance(runner.model, DistributedDataParallel)
        torch.manual_seed(7 + 1000003 * rank)  # per-rank streams, as the trainer seeds them
        for index in range(2):
            views, labels = batch(index)
            runner.step([v[SHARDS[rank]] for v in views], labels[SHARDS[rank]], 0)
        params = {n: p.detach() for n, p in method.named_parameters()}
        torch.save(params, out / f"{name}_rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
