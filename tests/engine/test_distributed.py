"""torchrun + DistributedDataParallel on the CPU (gloo): runs, resume, and gradient equivalence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import helpers
import lmcl_ddp_worker
import okdph_ddp_worker
import pytest
import torch

import okd.methods  # noqa: F401  (registers every method)
from okd.data import build_loaders
from okd.engine.builder import build_optimization
from okd.engine.seeding import seed_everything
from okd.engine.step import prepare_method, sum_losses
from okd.io import load_checkpoint
from okd.methods.base import METHODS
from okd.methods.build import build_method, load_config
from okd.methods.lmcl_meta import hypergradient
from okd.runs.metrics import read_metrics_csv

pytestmark = pytest.mark.slow  # every test here trains under torchrun or two processes

METHOD_CONFIGS = {
    "baseline": "cifar10/baseline_resnet20",
    "ffsd": "cifar10/ffsd_resnet20",
    "dml": "cifar100/dml_resnet32",
    "mcl": "cifar100/mcl_resnet32",  # its recipe's class-balanced sampler: 8 classes x 2 images per batch of 16
    "okdph": "cifar10/okdph_resnet32",  # a view per network (hflip, cutout, RandAugment), fusion after the epoch
}
#: how a global batch of 16 is split between 2 processes: strided, or in whole classes (data.sampler=m_per_class)
SHARDS = {"mcl": (slice(0, 8), slice(8, 16))}


def overrides(root: Path, out: Path, name: str, epochs: int, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    settings = {
        "data.dataset": "cifar10",
        "data.limit_train": 128,
        "data.limit_test": 90,
        "data.batch_size": 16,
        "data.test_batch_size": 40,
        "model.name": "resnet20",
        "train.max_steps_per_epoch": steps,
        "train.progress": "log",
        "seed": 5,
    }
    return [*helpers.quick_overrides(root, out, name, epochs, settings), *extra]


def torchrun(config: str, args: list[str], nproc: int = 2, resume: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    cmd += ["-m", "okd", "train"]
    cmd += ["--resume", str(resume), *args] if resume else [config, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("method", ["baseline", "ffsd", "dml", "mcl", "okdph"])
def test_one_ddp_step_equals_the_mean_of_per_shard_gradients(method, cifar10_root, tmp_path):
    """A 2-process step equals a single-process step on the same global batch whose gradient is the mean of
    the two shards' gradients (BatchNorm statistics are per process on the CPU, as without SyncBatchNorm), followed
    by the step's and the epoch's hooks (OKDPH's fusion)."""
    config = METHOD_CONFIGS[method]
    args = overrides(cifar10_root, tmp_path, "ddp", epochs=1, steps=1)
    torchrun(config, args)
    ddp_state = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ddp_state["world_size"] == 2

    cfg = load_config(config, args)
    torch.use_deterministic_algorithms(True)
    seed_everything(cfg.run.seed)
    cls = METHODS.get(cfg.method_name)
    views = cls.views_for(cfg.method_params), cls.view_augmentations(cfg.method_params)
    train_loader, _, num_classes, _ = build_loaders(cfg.run.data, cfg.run.seed, "cpu", *views)
    train_loader.channels_last = cfg.run.train.channels_last  # the same layout as the trainer's
    ref = prepare_method(build_method(cfg, num_classes), cfg.run.train)
    plan = build_optimization(ref, cfg)
    train_loader.set_epoch(0)
    images, labels = next(iter(train_loader))
    for opt in plan.optimizers:
        opt.zero_grad(set_to_none=True)
    for shard in SHARDS.get(method, (slice(0, None, 2), slice(1, None, 2))):
        views = [v[shard] for v in images] if isinstance(images, list) else images[shard]
        losses = ref.training_step(views, labels[shard], 0)
        (sum(v for k, v in losses.items() if not k.startswith("stat/")) / 2).backward()
    for opt in plan.optimizers:
        opt.step()
    ref.after_optimizer_step()
    ref.after_evaluation(0)
    params = dict(ref.named_parameters())
    for name, value in ddp_state["method"].items():
        if name in params:
            torch.testing.assert_close(value, params[name].detach(), rtol=1e-5, atol=1e-6, msg=name)


def lmcl_reference(meta_every: int) -> dict[str, torch.Tensor]:
    """One process on the worker's two batches: each main step on the mean over the shards of each shard's loss;
    after the first, with ``meta_every > 0``, the meta round on the means over the shards of L_in and L_out."""
    ref, optimizers, _ = lmcl_ddp_worker.build(meta_every)
    for index in range(2):
        images, labels = lmcl_ddp_worker.batch(index)
        shards = [(images[s], labels[s]) for s in lmcl_ddp_worker.SHARDS]
        optimizers[0].zero_grad(set_to_none=True)
        for x, y in shards:
            (sum_losses(ref.training_step(x, y, 0)) / len(shards)).backward()
        optimizers[0].step()
        if index == 0 and meta_every:

            def mean_over_shards(objective, shards=shards):
                return lambda theta: sum(objective(theta, x, y) for x, y in shards) / len(shards)

            phi = list(ref.weight_net.parameters())
            settings = ref.meta_settings(optimizers[0].param_groups[0]["lr"])
            inner, outer = mean_over_shards(ref.inner_objective), mean_over_shards(ref.outer_objective)
            grads, _ = hypergradient([p for _, _, p in ref.theta()], phi, inner, outer, settings)
            for p, g in zip(phi, grads, strict=True):
                p.grad = g
            optimizers[1].step()
    return {n: p.detach() for n, p in ref.named_parameters()}


def test_lmcl_ddp_steps_and_meta_round_equal_the_mean_over_shards(tmp_path):
    """L-MCL under DDP, two steps with a meta round after the first (and, with meta_every=0, two plain steps):
    both processes end with bitwise the same networks and phi, equal (float64 rounding) to one process that steps
    the mean over the two shards of each shard's main loss and runs the meta round on the means over the shards of
    L_in and L_out (contrastive terms and BatchNorm statistics per shard). phi gets no gradient in the main step:
    DDP must leave it out, or its second step fails."""
    worker = Path(lmcl_ddp_worker.__file__)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(worker)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    phi_init = {n: p.detach() for n, p in lmcl_ddp_worker.build(0)[0].named_parameters() if n.startswith("weight_")}
    for meta_every in lmcl_ddp_worker.META_EVERY:
        ranks = [torch.load(tmp_path / f"meta{meta_every}_rank{r}.pt") for r in range(2)]
        params = lmcl_reference(meta_every)
        assert ranks[0].keys() == ranks[1].keys() == params.keys()
        for name, value in ranks[0].items():
            assert torch.equal(value, ranks[1][name]), (meta_every, name)
            torch.testing.assert_close(value, params[name], rtol=1e-10, atol=1e-12, msg=f"{meta_every} {name}")
        moved = [not torch.equal(ranks[0][n], v) for n, v in phi_init.items()]
        assert all(moved) if meta_every else not any(moved)  # phi takes its meta step, and only that one


def okdph_reference(name: str) -> dict[str, torch.Tensor]:
    """One process on the worker's two batches: each step on the mean over the shards of each shard's loss, with
    the r that rank 0 draws (from rank 0's stream, once per step), then the batch-level fusion."""
    ref, optimizers, _ = okdph_ddp_worker.build(name)
    torch.manual_seed(7)  # rank 0's stream
    for index in range(2):
        views, labels = okdph_ddp_worker.batch(index)
        r = ref.mix_weights()
        ref.mix_weights = lambda r=r: r  # both shards mix with this step's one draw
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        for s in okdph_ddp_worker.SHARDS:
            (sum_losses(ref.training_step([v[s] for v in views], labels[s], 0)) / 2).backward()
        for opt in optimizers:
            opt.step()
        ref.after_optimizer_step()
        del ref.mix_weights
    return {n: p.detach() for n, p in ref.named_parameters()}


def test_okdph_ddp_steps_keep_the_ranks_identical_and_equal_the_mean_over_shards(tmp_path):
    """OKDPH under DDP, two steps with batch-level fusion, as released (mean mix) and in the paper's reading (a
    Dirichlet r per step from per-rank streams, H's loss through the mix): both processes end with bitwise the
    same students and H, equal (float64 rounding) to one process stepping the mean over the shards with rank 0's
    r. Each rank drawing its own r would give each its own H, and fusion would pull the ranks apart."""
    worker = Path(okdph_ddp_worker.__file__)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(worker)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    init = {n: p.detach() for n, p in okdph_ddp_worker.build("mean")[0].named_parameters()}
    for name in okdph_ddp_worker.SETTINGS:
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(2)]
        params = okdph_reference(name)
        assert ranks[0].keys() == ranks[1].keys() == params.keys()
        assert any(k.startswith("hwm.") for k in params)
        for key, value in ranks[0].items():
            assert torch.equal(value, ranks[1][key]), (name, key)
            torch.testing.assert_close(value, params[key], rtol=1e-10, atol=1e-12, msg=f"{name} {key}")
        assert not torch.equal(ranks[0]["hwm.fc.weight"], init["hwm.fc.weight"])  # H was rebuilt


@pytest.mark.parametrize("method", ["ffsd", "dml", "okdph"])
def test_ddp_run_writes_one_folder_and_resumes_exactly(method, cifar10_root, tmp_path):
    config = METHOD_CONFIGS[method]
    torchrun(config, overrides(cifar10_root, tmp_path, "full", epochs=2, steps=2))
    torchrun(config, overrides(cifar10_root, tmp_path, "split", epochs=1, steps=2))
    torchrun(config, ["train.epochs=2"], resume=tmp_path / "split")
    full, split = tmp_path / "full", tmp_path / "split"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "split"]
    helpers.assert_same_runs(full, split)
    rows = read_metrics_csv(full / "metrics.csv")
    # every test image scored exactly once: 90 images, accuracies are multiples of 100/90
    for key, value in rows[-1].items():
        if key.startswith("test/") and key.endswith("top1") and "_avg/" not in key:  # averages of heads aside
            assert abs(value * 90 / 100 - round(value * 90 / 100)) < 1e-6, key


def test_resume_with_another_process_count_is_refused(cifar10_root, tmp_path, capsys):
    from okd.cli import main

    torchrun(METHOD_CONFIGS["baseline"], overrides(cifar10_root, tmp_path, "two", epochs=1, steps=1))
    before = (tmp_path / "two" / "last.pt").read_bytes()
    assert main(["train", "--resume", str(tmp_path / "two"), "train.epochs=2"]) == 2
    assert helpers.mentions(capsys.readouterr().err, "2 process")  # the message says why
    assert (tmp_path / "two" / "last.pt").read_bytes() == before


def test_imagenet_ffsd_under_torchrun_writes_one_run_folder(tmp_path):
    """The scale-out acceptance command on a tiny ImageNet-style folder of JPEGs written here."""
    pytest.importorskip("PIL")
    import folder_fixtures

    root = folder_fixtures.write_imagenet_folder(tmp_path / "imagenet")
    args = [
        f"data.root={root}",
        "data.batch_size=4",
        "data.test_batch_size=4",
        "data.workers=0",
        "train.epochs=1",
        "train.progress=log",
        f"output_dir={tmp_path / 'runs'}",
        "name=r18",
    ]
    torchrun("imagenet/ffsd_resnet18", args)
    run = tmp_path / "runs" / "r18"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r18"]
    row = read_metrics_csv(run / "metrics.csv")[-1]
    assert {"test/leader/top1", "test/leader/top5", "lr/leader", "lr/sd1"} <= set(row)
    assert load_checkpoint(run / "last.pt")["world_size"] == 2


def test_tinyimagenet_dml_resumes_exactly_under_two_processes(tmp_path):
    pytest.importorskip("PIL")
    import folder_fixtures

    root = folder_fixtures.write_tinyimagenet_folder(tmp_path / "data", train_per_class=4)
    base = [
        f"data.root={root}",
        "data.dataset=tinyimagenet",
        "data.batch_size=4",
        "data.test_batch_size=4",
        "data.workers=0",
        "model.name=resnet18",
        "train.deterministic=true",
        "train.progress=log",
        f"output_dir={tmp_path / 'runs'}",
        "seed=3",
    ]
    config = "cifar100/dml_resnet32"
    torchrun(config, [*base, "train.epochs=2", "name=full"])
    torchrun(config, [*base, "train.epochs=1", "name=split"])
    torchrun(config, ["train.epochs=2"], resume=tmp_path / "runs" / "split")
    helpers.assert_same_runs(tmp_path / "runs" / "full", tmp_path / "runs" / "split", metrics=False)
