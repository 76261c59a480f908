"""SwitOKD under DistributedDataParallel (okd/methods/switokd.py, docs/methods.md#switokd): two gloo processes on
the CPU, each stepping its half of every batch through the trainer's runner, against one process stepping the
whole batch. The switch statistics are global batch means, so both ranks take the whole batch's mode, also on a
batch whose two halves alone would take different modes; a paused teacher's wrapper takes no backward and no
rank hangs on it. Shards of 4 and 3 images (a short last batch) still give the means over all 7. The networks
run in eval mode (BatchNorm on running statistics), so a half batch's logits are bitwise those rows of the whole
batch's and the comparison is exact up to rounding."""

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
from okd.methods.switokd import expert_mode, switch_statistics

WORLD, BATCH = 2, 8
STATS = ("d_s", "d_t", "gap", "epsilon", "delta", "expert")
#: step 1: teacher sure of class 0, student of class 1 (their fc weights zeroed, these biases); the even half
#: (rank 0) all labelled 0 (expert alone), the odd half (rank 1) mostly 1 (the teacher further from the labels:
#: learning alone); the whole batch: expert. Step 2: zero biases, both near uniform (G ~ 0): learning.
MIXED_LABELS = torch.tensor([0, 1, 0, 1, 0, 1, 0, 0])


def build():
    """A resnet20 teacher and student in float64 and eval mode, and the trainer's runner over their SGDs."""
    method = make("switokd", seed=0, student_lr=0.01).double().eval()
    optimizers = [build_optimizer(g) for g in method.param_groups()]
    runner = StepRunner(method, optimizers, TrainConfig(device="cpu", channels_last=False), torch.device("cpu"))
    return method, runner


def batches():
    """Three global batches: learning, the mixed batch above, learning again."""
    g = torch.Generator().manual_seed(3)
    out = []
    for step in range(3):
        x = torch.randn(BATCH, 3, 16, 16, generator=g, dtype=torch.float64)
        y = MIXED_LABELS.clone() if step == 1 else torch.randint(0, 10, (BATCH,), generator=g)
        out.append((x, y))
    return out


@torch.no_grad()
def set_heads(method, step: int) -> None:
    """The heads' edits before ``step`` (see ``MIXED_LABELS``)."""
    if step == 1:
        for net, cls, bias in ((method.teacher, 0, 6.0), (method.student, 1, 12.0)):
            net.fc.weight.zero_()
            net.fc.bias.zero_()
            net.fc.bias[cls] = bias
    elif step == 2:
        method.teacher.fc.bias.zero_()
        method.student.fc.bias.zero_()


def train(method, runner, shard: slice, steps: int = 3) -> list[dict]:
    """Steps on ``shard`` of each batch (the loader's rank::world positions); the statistics of each."""
    logged = []
    for step, (x, y) in enumerate(batches()[:steps]):
        set_heads(method, step)
        losses, _ = runner.step(x[shard], y[shard], 0)
        logged.append({k: float(losses[f"stat/{k}"]) for k in STATS})
    return logged


def odd_batch():
    """Seven hand-made logit pairs (K = 10): shards of 4 and 3 images, as in a short last batch."""
    g = torch.Generator().manual_seed(7)
    z = 3 * torch.randn(2, 7, 10, generator=g, dtype=torch.float64)
    return z[0], z[1], torch.randint(0, 10, (7,), generator=g)


def rank_main(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        method, runner = build()
        runner.wrap_distributed(DistContext(rank=rank, world_size=WORLD), TrainConfig(device="cpu"))
        logged = train(method, runner, slice(rank, None, WORLD))
        state = {k: v.clone() for k, v in method.state_dict().items()}
        momenta = [runner.optimizers[i].state_dict()["state"] for i in range(2)]
        z_t, z_s, y = (v[rank::WORLD] for v in odd_batch())
        odd = {k: float(v) for k, v in switch_statistics(z_t, z_s, y, 10, global_batch=True).items()}
        saved = {"stats": logged, "state": state, "momenta": momenta, "odd": odd}
        torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_mixed_batch_halves_alone_would_take_different_modes():
    """The precondition that makes the DDP test below decisive: per-rank statistics would split the ranks."""
    method, runner = build()
    train(method, runner, slice(None), steps=1)
    set_heads(method, 1)
    x, y = batches()[1]
    with torch.no_grad():
        z_t, z_s = method.teacher(x), method.student(x)
    halves = (slice(0, None, 2), slice(1, None, 2))
    modes = [bool(expert_mode(switch_statistics(z_t[s], z_s[s], y[s], 10))) for s in halves]
    assert modes == [True, False]
    assert bool(expert_mode(switch_statistics(z_t, z_s, y, 10)))


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    ranks = run_spawned_ranks(rank_main, (), tmp_path, WORLD)
    method, runner = build()
    want = train(method, runner, slice(None))
    assert [s["expert"] for s in want] == [0.0, 1.0, 0.0]  # both modes exercised
    for rank, got in enumerate(ranks):
        assert [s["expert"] for s in got["stats"]] == [s["expert"] for s in want], rank
        for step, (g, w) in enumerate(zip(got["stats"], want, strict=True)):
            for key in STATS:
                assert g[key] == pytest.approx(w[key], rel=1e-12, abs=1e-14), (rank, step, key)
        for name, value in method.state_dict().items():
            torch.testing.assert_close(got["state"][name], value, rtol=1e-10, atol=1e-12, msg=name)
        for i, opt in enumerate(runner.optimizers):
            for index, state in opt.state_dict()["state"].items():
                buf = got["momenta"][i][index]["momentum_buffer"]
                torch.testing.assert_close(buf, state["momentum_buffer"], rtol=1e-10, atol=1e-12)
    # unequal shards (4 and 3 images): the statistics are still the means over all 7 images
    odd = {k: float(v) for k, v in switch_statistics(*odd_batch(), 10).items()}
    for got in ranks:
        assert got["odd"] == pytest.approx(odd, rel=1e-12, abs=1e-14)
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name  # the ranks hold the same networks
    assert ranks[0]["stats"] == ranks[1]["stats"]
