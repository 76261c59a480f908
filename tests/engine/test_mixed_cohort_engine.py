"""The engine on a cohort of different networks (resnet20 beside the user's own network, docs/cohorts.md):
DistributedDataParallel over two processes (gloo, CPU), the whole step compiled as one graph, and ``okd bench``."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import helpers
import pytest
import torch
import torch._dynamo.testing
from cohort_fixtures import SMALL, mixed_overrides, user_module

from okd.bench import bench
from okd.config import TrainConfig
from okd.data import build_loaders
from okd.engine.builder import build_optimization, build_optimizer
from okd.engine.seeding import seed_everything
from okd.engine.step import StepRunner, prepare_method
from okd.io import load_checkpoint
from okd.methods.build import build_method, load_config
from okd.models import count_macs, create_model

MEMBERS = f"model.members=[resnet20,'{SMALL}']"
CONFIG = "cifar10/dml_resnet32"  # DML's packaged recipe; the members replace its model


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    with user_module(tmp_path_factory.mktemp("code")) as folder:
        yield folder


# ------------------------------------------------------------------------------------------------------- DDP
def torchrun(code: str, args: list[str], resume=None) -> None:
    """``okd train`` under torchrun, two processes, with the user's module importable in each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "okd", "train"]
    cmd += ["--resume", str(resume), *args] if resume else [CONFIG, *args]
    path = os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def ddp_args(root, out, name: str, epochs: int, steps: int) -> list[str]:
    extra = (MEMBERS, "data.limit_test=40", f"train.max_steps_per_epoch={steps}")
    return mixed_overrides(root, out, name, epochs, *extra)


@pytest.mark.slow
def test_ddp_mixed_cohort_step_is_the_mean_of_the_shards_and_resumes_exactly(code, cifar10_root, tmp_path):
    """Two processes: one step equals a single-process step whose gradient is the mean of the two shards'
    (BatchNorm statistics per process, as on the CPU without SyncBatchNorm); a run stopped after one epoch and
    resumed equals the straight run."""
    args = ddp_args(cifar10_root, tmp_path, "one_step", epochs=1, steps=1)
    torchrun(code, args)
    ddp_state = load_checkpoint(tmp_path / "one_step" / "last.pt")
    assert ddp_state["world_size"] == 2 and ddp_state["head_networks"] == {"net0": "resnet20", "net1": SMALL}

    cfg = load_config(CONFIG, args)
    torch.use_deterministic_algorithms(True)
    seed_everything(cfg.run.seed)
    loader, _, num_classes, _ = build_loaders(cfg.run.data, cfg.run.seed, "cpu")
    loader.channels_last = cfg.run.train.channels_last
    ref = prepare_method(build_method(cfg, num_classes), cfg.run.train)
    plan = build_optimization(ref, cfg)
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    for opt in plan.optimizers:
        opt.zero_grad(set_to_none=True)
    for shard in (slice(0, None, 2), slice(1, None, 2)):
        losses = ref.training_step(images[shard], labels[shard], 0)
        (sum(v for k, v in losses.items() if not k.startswith("stat/")) / 2).backward()
    for opt in plan.optimizers:
        opt.step()
    params = dict(ref.named_parameters())
    assert any(k.startswith("nets.1.net.") for k in params)  # the user's network, wrapped
    for name, value in ddp_state["method"].items():
        if name in params:
            torch.testing.assert_close(value, params[name].detach(), rtol=1e-5, atol=1e-6, msg=name)

    torchrun(code, ddp_args(cifar10_root, tmp_path, "full", epochs=2, steps=2))
    torchrun(code, ddp_args(cifar10_root, tmp_path, "split", epochs=1, steps=2))
    torchrun(code, ["train.epochs=2"], resume=tmp_path / "split")
    helpers.assert_same_runs(tmp_path / "full", tmp_path / "split")
    assert load_checkpoint(tmp_path / "full" / "deploy.pt")["model"] == "resnet20"


# --------------------------------------------------------------------------------------------------- compile
def runner(method, compile_: bool, backend) -> StepRunner:
    cfg = TrainConfig(device="cpu", channels_last=False, compile=compile_)
    optimizers = [build_optimizer(g) for g in method.param_groups() if g.params]
    return StepRunner(method, optimizers, cfg, torch.device("cpu"), compile_backend=backend, compile_fullgraph=True)


def assert_same_step(eager: StepRunner, compiled: StepRunner, x, y) -> None:
    """One step of each: the same losses, gradients and updated parameters and buffers (float tolerance)."""
    losses_e, total_e = eager.step(x, y, 0)
    losses_c, total_c = compiled.step(x, y, 0)
    assert set(losses_e) == set(losses_c)
    for key in losses_e:
        torch.testing.assert_close(losses_c[key], losses_e[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(total_c, total_e, rtol=1e-5, atol=1e-6)
    params_c = dict(compiled.method.named_parameters())
    for n, p in eager.method.named_parameters():
        torch.testing.assert_close(params_c[n].grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(params_c[n], p, rtol=1e-4, atol=1e-5, msg=n)
    buffers_c = dict(compiled.method.named_buffers())
    for n, b in eager.method.named_buffers():
        torch.testing.assert_close(buffers_c[n], b, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "backend"), [("dml", "eager"), ("kdcl", "eager"), ("dml", "aot_eager")])
def test_mixed_cohort_step_compiles_as_one_graph_and_equals_eager(code, method, backend):
    torch._dynamo.reset()
    cfg = load_config(None, [f"method.name={method}", MEMBERS, "data.dataset=cifar10"])
    torch.manual_seed(0)
    eager_method = build_method(cfg, 10).train()
    twin = copy.deepcopy(eager_method)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    x, y = (views[0] if method == "dml" else views), torch.randint(0, 10, (4,), generator=g)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    assert_same_step(runner(eager_method, False, "eager"), runner(twin, True, counter), x, y)
    assert counter.frame_count == 1  # fullgraph=True: any graph break would have raised


# ----------------------------------------------------------------------------------------------------- bench
def test_bench_times_a_mixed_cohort(code):
    cfg = load_config(None, ["method.name=dml", MEMBERS, "train.device=cpu", "data.batch_size=4", "data.root=/none"])
    report = bench(cfg, config_name="mixed", steps=1, warmup=0, windows=1)
    assert report.model == f"resnet20+{SMALL}" and [r.path for r in report.results] == ["okd", "reference"]
    assert all(r.images_per_s > 0 for r in report.results) and report.rows[0]["model"] == f"resnet20+{SMALL}"
    shape = (1, 3, 32, 32)
    expected = count_macs(create_model("resnet20", 100), shape) + count_macs(create_model(SMALL, 100), shape)
    assert report.macs.total == expected  # one forward of each member per image
