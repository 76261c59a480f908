"""SwitOKD 1T2S and 2T1S under DistributedDataParallel (okd/methods/switokd_multi.py, docs/methods.md#switokd): two
gloo processes on the CPU, each stepping its half of every batch through the trainer's runner, against one process
stepping the whole batch. The pair statistics are global batch means, so both ranks make the whole batch's
decisions: 1T2S through the one wrapper round the method (its teacher steps on an all-zero loss in the pushed
step), 2T1S through one wrapper per network (teacher 2 paused in the pushed step, its wrapper left out on both
ranks). The networks run in eval mode, so a half batch's logits are those rows of the whole batch's."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from method_helpers import make, run_spawned_ranks

from okd.config import TrainConfig
from okd.engine.builder import build_optimizer
from okd.engine.distributed import DistContext
from okd.engine.step import StepRunner

pytestmark = pytest.mark.slow  # two spawned processes per variant

WORLD, BATCH = 2, 8
KEYS = ("d_s", "d_t", "gap", "epsilon", "delta", "expert")
#: the pushed step (labels all 0): (class, bias) per member's fc, its weight zeroed
PUSH = {"switokd_1t2s": [(0, 6.0), (1, 12.0), (1, 12.0)], "switokd_2t1s": [(2, 16.0), (0, 6.0), (1, 12.0)]}
#: each step's decisions (pair 1, pair 2) on the whole batch: learning, pushed, after the push
EXPERTS = {"switokd_1t2s": [[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]], "switokd_2t1s": [[0.0, 0.0], [0.0, 1.0], [0.0, 1.0]]}


def build(name: str):
    method = make(name, seed=0).double().eval()
    optimizers = [build_optimizer(g) for g in method.param_groups()]
    return method, StepRunner(method, optimizers, TrainConfig(device="cpu", channels_last=False), torch.device("cpu"))


def batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for step in range(3):
        x = torch.randn(BATCH, 3, 16, 16, generator=g, dtype=torch.float64)
        y = torch.zeros(BATCH, dtype=torch.long) if step == 1 else torch.randint(0, 10, (BATCH,), generator=g)
        out.append((x, y))
    return out


@torch.no_grad()
def push(method, name: str, step: int) -> None:
    for net, (cls, bias) in zip(method.nets, PUSH[name], strict=True):
        if step == 1:
            net.fc.weight.zero_()
            net.fc.bias.zero_()
            net.fc.bias[cls] = bias
        elif step == 2:
            net.fc.bias.zero_()


def train(name: str, method, runner, shard: slice) -> list[dict]:
    logged = []
    for step, (x, y) in enumerate(batches()):
        push(method, name, step)
        losses, _ = runner.step(x[shard], y[shard], 0)
        logged.append({f"{p}_{k}": float(losses[f"stat/{p}_{k}"]) for p in ("pair1", "pair2") for k in KEYS})
    return logged


def tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested optimizer state dict, by path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in tensors(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in tensors(sub, f"{prefix}/{i}").items()}
    return {}


def rank_main(name: str, rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        method, runner = build(name)
        runner.wrap_distributed(DistContext(rank=rank, world_size=WORLD), TrainConfig(device="cpu"))
        logged = train(name, method, runner, slice(rank, None, WORLD))
        state = {k: v.clone() for k, v in method.state_dict().items()}
        optim = tensors([o.state_dict()["state"] for o in runner.optimizers])
        torch.save({"stats": logged, "state": state, "optim": optim}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["switokd_1t2s", "switokd_2t1s"])
def test_two_processes_equal_one_process_on_the_whole_batch(name, tmp_path):
    ranks = run_spawned_ranks(rank_main, (name,), tmp_path, WORLD)
    method, runner = build(name)
    want = train(name, method, runner, slice(None))
    assert [[s["pair1_expert"], s["pair2_expert"]] for s in want] == EXPERTS[name]
    optim = tensors([o.state_dict()["state"] for o in runner.optimizers])
    for rank, got in enumerate(ranks):
        for step, (g, w) in enumerate(zip(got["stats"], want, strict=True)):
            assert g == pytest.approx(w, rel=1e-12, abs=1e-14), (rank, step)
        for key, value in method.state_dict().items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-10, atol=1e-12, msg=key)
        assert set(got["optim"]) == set(optim), rank  # the same optimizer state entries (none for a paused one)
        for key, value in optim.items():
            torch.testing.assert_close(got["optim"][key], value, rtol=1e-9, atol=1e-12, msg=key)
