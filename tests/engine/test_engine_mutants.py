"""Fast unit checks of the trainer's pieces whose effect shows only in logs, resumes or later epochs."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
from helpers import RecordingDDP

from okd.config import TrainConfig
from okd.engine import distributed
from okd.engine import epoch as epoch_module
from okd.engine import trainer as trainer_module
from okd.engine.distributed import DistContext, all_gather_objects, all_reduce_sum, barrier, shutdown
from okd.engine.run_log import epoch_line
from okd.engine.step import StepRunner, compile_loss_function, configure_backends, prepare_method
from okd.engine.trainer import (
    _check_teacher_file,
    _GracefulStop,
    _log_start,
    _log_summary,
    _members_note,
    _report_epoch,
    rank_rng_state,
    run_stem,
)
from okd.errors import ConfigError, StopRequested
from okd.methods.build import build_method, load_config


def test_start_line_gives_the_per_process_batch(tmp_path, caplog, monkeypatch):
    """A global batch of 64 over 2 processes is logged as 32 images per process (an integer); the thread-count
    warning is given on the CPU only."""
    from okd.engine import trainer as trainer_mod

    warned = []
    monkeypatch.setattr(trainer_mod, "warn_threads_once", lambda: warned.append(True))
    cfg = load_config("cifar10/baseline_resnet20", ["data.batch_size=64"])
    two, plan = DistContext(rank=0, world_size=2), SimpleNamespace(lr_factor=1.0)
    with caplog.at_level(logging.INFO, logger="okd"):
        _log_start(cfg, tmp_path, two, plan, torch.device("cpu"))
    assert "global batch 64 (32 per process)" in caplog.text
    assert " x2;" in caplog.text and warned == [True]
    _log_start(cfg, tmp_path, two, plan, torch.device("cuda", 0))  # a device object only: nothing runs on it
    assert warned == [True]


def test_resume_picks_the_rank_rng_state():
    """Each rank restores its own saved generators; a rank the saved run did not have takes rank 0's."""
    saved = [{"rank": 0}, {"rank": 1}]
    assert rank_rng_state(saved, 0) == {"rank": 0}
    assert rank_rng_state(saved, 1) == {"rank": 1}
    assert rank_rng_state(saved[:1], 1) == {"rank": 0}  # one process saved, two resume
    assert rank_rng_state(saved, 2) == {"rank": 0}


# --------------------------------------------------------------------- one epoch's step loop (fakes, no data)
class _Loader(list):
    """Batches of (images, labels); remembers the epoch it was set to."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def _batches(sizes: list[int]) -> _Loader:
    return _Loader((torch.zeros(n, 1), torch.zeros(n, dtype=torch.long)) for n in sizes)


class _Runner:
    """Step i returns losses a = i + 1 and b = 10 (i + 1), total = a + b (or ``totals[i]`` when given)."""

    def __init__(self, totals=None):
        self.method, self.device, self.steps, self.totals = torch.nn.Linear(1, 1), torch.device("cpu"), 0, totals

    def step(self, images, labels, epoch):
        i, self.steps = self.steps, self.steps + 1
        a, b = torch.tensor(i + 1.0), torch.tensor(10.0 * (i + 1))
        total = a + b if self.totals is None else torch.tensor(self.totals[i])
        return {"a": a, "b": b}, total


def _train_cfg(**kw):
    return SimpleNamespace(**{"max_steps_per_epoch": None, "progress": "none", "epochs": 5, **kw})


class _Clock:
    """time.perf_counter of okd.engine.epoch: 100, 102, 104, ... seconds at successive calls."""

    def __init__(self):
        self.now = 98.0

    def perf_counter(self) -> float:
        self.now += 2.0
        return self.now


def test_train_epoch_sums_per_image_per_key(monkeypatch):
    from okd.engine import epoch as epoch_mod

    monkeypatch.setattr(epoch_mod, "time", _Clock())
    loader = _batches([4, 4, 2])
    row = epoch_mod.train_epoch(_Runner(), loader, 2, _train_cfg(), DistContext())
    assert loader.epoch == 2 and row["epoch"] == 3
    assert row["train/a"] == (4 * 1 + 4 * 2 + 2 * 3) / 10
    assert row["train/b"] == (4 * 10 + 4 * 20 + 2 * 30) / 10
    assert row["train/loss"] == (4 * 11 + 4 * 22 + 2 * 33) / 10
    assert row["time/epoch_s"] == 2.0 and row["time/images_per_s"] == 5.0  # clock read at start and end


def test_train_epoch_caps_steps_and_counts_nonfinite_steps(monkeypatch):
    import pytest

    from okd.engine import epoch as epoch_mod
    from okd.errors import NonFiniteError

    runner = _Runner()
    row = epoch_mod.train_epoch(runner, _batches([4, 4, 2]), 0, _train_cfg(max_steps_per_epoch=2), DistContext())
    assert runner.steps == 2 and row["train/a"] == (4 * 1 + 4 * 2) / 8
    assert epoch_mod.steps_per_epoch(_batches([4, 4, 2]), _train_cfg(max_steps_per_epoch=2)) == 2
    assert epoch_mod.steps_per_epoch(_batches([4, 4, 2]), _train_cfg(max_steps_per_epoch=5)) == 3
    assert epoch_mod.steps_per_epoch(_batches([4, 4, 2]), _train_cfg()) == 3
    bad = _Runner(totals=[1.0, float("nan"), float("inf")])
    with pytest.raises(NonFiniteError, match=r"epoch 4: .* in 2 step\(s\)"):
        epoch_mod.train_epoch(bad, _batches([4, 4, 2]), 3, _train_cfg(), DistContext())


def test_train_epoch_bar_shows_epoch_and_run_eta(monkeypatch):
    """The bar reads "epoch k/N"; each step passes the ETA its step time and the steps/epochs still to come."""
    import tqdm

    from okd.engine import epoch as epoch_mod

    bars, etas = [], []

    class Bar:
        def __init__(self, iterable, **kw):
            self.iterable, self.kw = iterable, kw
            bars.append(self)

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix_str(self, text, refresh=True):
            self.text = text

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    monkeypatch.setattr(epoch_mod, "time", _Clock())
    monkeypatch.setattr(epoch_mod, "live_eta", lambda *args: etas.append(args) or 0.0)
    epoch_mod.train_epoch(_Runner(), _batches([4, 4, 2]), 1, _train_cfg(progress="bar"), DistContext(), [7.0])
    assert bars[0].kw["desc"] == "epoch 2/5" and bars[0].kw["total"] == 3 and bars[0].text == "run ETA 0s"
    assert etas == [([7.0], 3, 2.0, 2, 3), ([7.0], 3, 2.0, 1, 3), ([7.0], 3, 2.0, 0, 3)]
    etas.clear()
    epoch_mod.train_epoch(_Runner(), _batches([4]), 1, _train_cfg(progress="bar"), DistContext(rank=1), [7.0])
    assert etas == [] and len(bars) == 1  # only the main process draws a bar


def test_interactive_progress(monkeypatch):
    from okd.engine import epoch as epoch_mod

    for tty, expected in ((False, (True, False, False)), (True, (True, True, False))):
        monkeypatch.setattr(epoch_mod.sys.stderr, "isatty", lambda tty=tty: tty, raising=False)
        assert tuple(epoch_mod.interactive(p) for p in ("bar", "auto", "none")) == expected


def test_stop_message_says_what_the_folder_holds(tmp_path):
    from okd.engine.trainer import _stop_message

    def message(done: int) -> str:
        return _stop_message(SimpleNamespace(committed_epoch=done), tmp_path, 3)

    assert message(0).startswith("stopped before the first epoch was committed")
    assert message(1).startswith("stopped after epoch 1 (committed in last.pt); continue with: okd train --resume")
    assert message(2).startswith("stopped after epoch 2 ")
    assert message(3).startswith("stopped after its last epoch (3) was committed")


def test_summary_reports_the_deployed_head(tmp_path, caplog):
    """The closing summary names the deployed head (not the first head of the row); without one, the first."""
    from okd.engine.trainer import _log_summary

    history = [
        {"epoch": 1, "test/a/top1": 10.0, "test/b/top1": 40.0},
        {"epoch": 2, "test/a/top1": 20.0, "test/b/top1": 30.0},
    ]
    with caplog.at_level(logging.INFO, logger="okd"):
        _log_summary(tmp_path, history, "b", 5.0)
        assert "deployed head: b, top-1 30.00 at epoch 2" in caplog.text
        assert "best top-1 of b: 40.00 at epoch 1" in caplog.text and "deploy.pt: (none)" in caplog.text
        caplog.clear()
        _log_summary(tmp_path, history, None, 5.0)
        assert "deployed head: a, top-1 20.00 at epoch 2" in caplog.text


# --------------------------------------------------------------------- the held-out pass and the finite check
def test_holdout_pass_runs_without_autograd_under_the_runs_autocast():
    """KDCL's pass over the held-out split builds no graph (none would outlive it) and runs in the run's
    precision."""
    from okd.engine.trainer import fit_on_holdout

    seen = []

    class Method(torch.nn.Module):
        def fit_on_holdout(self, batches):
            seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), list(batches)))

    for precision, autocast in (("fp32", False), ("bf16", True)):
        seen.clear()
        fit_on_holdout(Method(), [1, 2], SimpleNamespace(precision=precision), torch.device("cpu"))
        assert seen == [(False, autocast, [1, 2])]
    assert torch.is_grad_enabled()


def test_check_finite_refuses_nan_weights_buffers_and_metrics():
    """Before a commit: a NaN/inf parameter or buffer, or a non-finite metric of the row, stops the epoch; a
    finite method and row pass."""
    import pytest

    from okd.engine.trainer import _check_finite
    from okd.errors import NonFiniteError

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    row = {"epoch": 3, "train/loss": 0.5, "test/net/top1": 10.0}
    _check_finite(net, row, 3)
    with pytest.raises(NonFiniteError, match=r"epoch 3: test/net/top1 is not finite"):
        _check_finite(net, {**row, "test/net/top1": float("inf")}, 3)
    with torch.no_grad():
        net[1].running_var[1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"epoch 3: 1.running_var is not finite"):
        _check_finite(net, row, 3)
    with torch.no_grad():
        net[1].running_var.fill_(1.0)
        net[0].weight[0, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"epoch 4: 0.weight is not finite"):
        _check_finite(net, row, 4)


def test_sync_bn_and_stepwise_methods_are_refused_before_the_ddp_wrap():
    """train.sync_bn=true on the CPU, and a method that steps its optimizers one by one, are refused with okd's
    message before SyncBatchNorm or DistributedDataParallel is built (no process group is needed to refuse)."""
    import pytest

    from okd.engine.step import StepRunner
    from okd.errors import ConfigError

    cfg = load_config("cifar10/baseline_resnet20", ["train.sync_bn=true"]).run.train
    method = SimpleNamespace(manual_optimization=False)
    runner = StepRunner(method, [], cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train.sync_bn=true needs CUDA devices"):
        runner.wrap_distributed(DistContext(rank=0, world_size=2), cfg)
    assert runner.method is method and runner.model is method
    stepwise = StepRunner(SimpleNamespace(manual_optimization=True), [], cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="steps its optimizers one by one"):
        stepwise.wrap_distributed(DistContext(rank=0, world_size=2), cfg)
    dml = load_config(None, ["method.name=dml", "method.alternate_updates=true"])
    alternating = StepRunner(build_method(dml, 10), [], dml.run.train, torch.device("cpu"))
    with pytest.raises(ConfigError, match="DML's method.alternate_updates=true"):  # Method's own defaults refuse it
        alternating.wrap_distributed(DistContext(rank=0, world_size=2), dml.run.train)


def test_a_wrapped_runner_averages_a_manual_steps_gradients_over_its_processes(monkeypatch):
    """After wrap_distributed, average_across_processes divides the all-reduced sum by the world size (here an
    all-reduce that stands in for two ranks holding the same tensors)."""
    from okd.engine.step import StepRunner

    cfg = load_config("cifar10/baseline_resnet20").run.train
    wrapped = []
    method = SimpleNamespace(manual_optimization=True, ddp_per_network=True, distribute_networks=wrapped.append)
    runner = StepRunner(method, [], cfg, torch.device("cpu"))
    grads = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    assert runner.average_across_processes(grads) is grads  # one process: the tensors themselves
    runner.wrap_distributed(DistContext(rank=0, world_size=2), cfg)
    assert len(wrapped) == 1 and runner.world_size == 2
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: t.mul_(2))
    averaged = runner.average_across_processes(grads)
    assert [a.tolist() for a in averaged] == [[1.0, 2.0], [[3.0]]]


def test_train_epoch_keeps_no_graph_in_its_loss_sums(monkeypatch):
    """The per-key and total sums hold detached values: a step's graph must not live on for the whole epoch."""
    from okd.engine import epoch as epoch_mod

    class GraphRunner(_Runner):
        def step(self, images, labels, epoch):
            w = torch.ones((), requires_grad=True)
            losses, total = super().step(images, labels, epoch)
            return {k: v * w for k, v in losses.items()}, total * w

    reduced = []

    def all_reduce_sum(packed, dist):
        reduced.append(packed.requires_grad)
        return packed

    monkeypatch.setattr(epoch_mod, "all_reduce_sum", all_reduce_sum)
    row = epoch_mod.train_epoch(GraphRunner(), _batches([4, 2]), 0, _train_cfg(), DistContext())
    assert reduced == [False] and row["train/a"] == (4 * 1 + 2 * 2) / 6


def test_deterministic_mode_switches_cudnn_autotuning_off(monkeypatch):
    """With deterministic kernels cuDNN neither autotunes nor picks non-deterministic algorithms; without, it
    autotunes where CUDA is present."""
    from okd.engine.seeding import set_deterministic

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    set_deterministic(True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    set_deterministic(False)
    assert not torch.backends.cudnn.benchmark


def test_runner_state_restores_the_grad_scaler_only_where_there_is_one():
    """fp16 keeps a grad scaler whose state last.pt carries; an fp32 runner (no scaler) ignores a saved one, and
    an fp16 runner given none keeps its fresh scaler."""
    from okd.engine.step import StepRunner

    cfg16 = load_config("cifar10/baseline_resnet20", ["train.precision=fp16"]).run.train
    cfg32 = load_config("cifar10/baseline_resnet20").run.train
    method = SimpleNamespace(manual_optimization=False)
    saved = StepRunner(method, [], cfg16, torch.device("cpu"))
    saved.scaler.scale(torch.ones(()))  # the scale is made lazily
    saved.scaler.update(1024.0)
    state = saved.state_dict()
    assert state["scaler"]["scale"] == 1024.0
    fp16 = StepRunner(method, [], cfg16, torch.device("cpu"))
    fp16.load_state_dict({})  # an older last.pt without a runner entry
    assert fp16.scaler.get_scale() == 65536.0
    fp16.load_state_dict(state)
    assert fp16.scaler.get_scale() == 1024.0
    fp32 = StepRunner(method, [], cfg32, torch.device("cpu"))
    fp32.load_state_dict(state)
    assert fp32.scaler is None and fp32.state_dict() == {"scaler": None}


# ------------------------------------------------------------------------- the checks before anything is built
def _committed(folder, cfg, **extra):
    """A run folder whose last.pt commits epoch 1 of ``cfg`` (no weights: the start checks read no tensors)."""
    from okd.runs.records import CHECKPOINT_FORMAT

    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    last = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "epoch": 1, "num_classes": 10, "history": []}
    last |= {"best": {"epoch": 1}, "method": {}, "optimizers": [], "schedulers": [], "rng_per_rank": [{}], **extra}
    torch.save(last, folder / "last.pt")
    return folder


def test_start_checks_refuse_before_data_or_models_are_built(tmp_path):
    """okd train refuses, before reading data: a folder that holds a run (no --resume), results without a commit,
    a resume that changes the recipe or the method, and another process count (unless allowed)."""
    import pytest

    from okd.engine.trainer import _check_start
    from okd.errors import CheckpointError, ConfigError
    from okd.runs.store import RunStore

    base = "cifar10/baseline_resnet20"
    cfg = load_config(base)
    one = DistContext()
    run = _committed(tmp_path / "run", cfg, world_size=2)
    with RunStore(run).lock(create=False) as store:
        with pytest.raises(ConfigError, match="already holds a run; continue it with `okd train --resume"):
            _check_start(cfg, store, False, one)
        with pytest.raises(ConfigError, match=r"cannot change optim.lr on resume"):
            _check_start(load_config(base, ["optim.lr=0.5"]), store, True, one)
        with pytest.raises(CheckpointError, match="it was trained as method/model/dataset baseline/resnet20/cifar10"):
            _check_start(load_config(None, ["method.name=dml", "model.name=resnet20", "data.dataset=cifar10"]),
                         store, True, one)  # fmt: skip
        with pytest.raises(CheckpointError, match=r"trained with 2 process\(es\) and is resumed with 1"):
            _check_start(cfg, store, True, one)
        allowed = load_config(base, ["train.allow_world_size_change=true"])
        assert _check_start(allowed, store, True, one)["epoch"] == 1
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "metrics.csv").write_text("epoch\n1\n")
    with RunStore(orphan).lock(create=False) as store:
        with pytest.raises(ConfigError, match=r"holds results of an earlier run \(metrics.csv\) but no last.pt"):
            _check_start(cfg, store, False, one)
    assert (orphan / "metrics.csv").read_text() == "epoch\n1\n"


def test_the_step_computes_its_losses_under_the_runs_autocast():
    from okd.engine.step import loss_function

    seen = []

    def model(images, labels, epoch, scalars):
        seen.append(torch.is_autocast_enabled("cpu"))
        return {"a/ce": torch.ones(()), "stat/x": torch.full((), 5.0)}

    for precision in ("bf16", "fp32"):
        cfg = SimpleNamespace(precision=precision)
        losses, total = loss_function(model, cfg, torch.device("cpu"))(None, None, 0, None)
        assert total.item() == 1.0  # stat/ terms are logged, not trained
    assert seen == [True, False]


class _LinearMethod(torch.nn.Module):
    """A one-weight 'method': loss = w . x, so each step's gradient is x alone."""

    manual_optimization = False

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.after = 0

    def forward(self, images, labels, epoch, scalars):
        return {"net/loss": (self.w * images).sum(), "stat/w0": self.w[0].detach()}

    def epoch_scalars(self, epoch):
        return {}

    def after_optimizer_step(self):
        self.after += 1


def test_each_step_starts_from_fresh_gradients_and_steps_the_schedules():
    """Gradients do not accumulate from one step to the next; the per-step schedules and the after-step hook
    run once per step."""
    method = _LinearMethod()
    opt = torch.optim.SGD(method.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    cfg = load_config("cifar10/baseline_resnet20").run.train
    runner = StepRunner(method, [opt], cfg, torch.device("cpu"), schedulers=[sched])
    x = torch.tensor([1.0, -2.0])
    for _ in range(3):
        losses, total = runner.step(x, None, 0)
    assert torch.equal(method.w.detach(), -3 * x)  # w - x each step, never w - (1 + 2 + ...) x
    assert sched.last_epoch == 3 and method.after == 3 and set(losses) == {"net/loss", "stat/w0"}
    assert total.item() == (method.w.detach() + x) @ x  # the last step's loss, stat terms left out


def test_zero_grad_frees_the_gradients_of_one_or_every_optimizer():
    """Gradients are set to None, not to zeros: a parameter with no gradient in a step is skipped by its optimizer
    (no weight decay, no momentum step) instead of being moved by a zero gradient."""
    first, second = _LinearMethod(), _LinearMethod()
    optimizers = [torch.optim.SGD(m.parameters(), lr=1.0) for m in (first, second)]
    cfg = load_config("cifar10/baseline_resnet20").run.train
    runner = StepRunner(first, optimizers, cfg, torch.device("cpu"))
    for m in (first, second):
        (m.w * 2).sum().backward()
    runner.zero_grad(1)
    assert first.w.grad is not None and second.w.grad is None
    runner.zero_grad()
    assert first.w.grad is None


class _ManualMethod(_LinearMethod):
    """A 'method' that steps its own optimizers (as DML's alternate updates do) and records the autocast state."""

    manual_optimization = True

    def __init__(self):
        super().__init__()
        self.autocast = []

    def manual_step(self, images, labels, epoch, runner):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return {"net/loss": (self.w * images).sum().detach()}


@pytest.mark.parametrize("precision, autocast", [("bf16", True), ("fp32", False)])
def test_a_manual_step_runs_under_the_runs_autocast(precision, autocast):
    """A method that steps its optimizers itself computes under the run's precision like every other method."""
    method = _ManualMethod()
    cfg = load_config("cifar10/baseline_resnet20", [f"train.precision={precision}"]).run.train
    runner = StepRunner(method, [torch.optim.SGD(method.parameters(), lr=1.0)], cfg, torch.device("cpu"))
    losses, total = runner.step(torch.tensor([1.0, -2.0]), None, 0)
    assert method.autocast == [autocast] and method.after == 1 and total.item() == 0.0


# ------------------------------------------------------------------------------- the DDP wrap (a stand-in)
@pytest.fixture
def recording_ddp(monkeypatch):
    return RecordingDDP.install(monkeypatch)


class _AveragingMethod(_LinearMethod):
    """A method with a parameter whose gradient it averages itself (DDP must leave it alone)."""

    def __init__(self):
        super().__init__()
        self.v = torch.nn.Parameter(torch.zeros(1))

    def ddp_ignored_parameters(self):
        return ["v"]


def test_the_whole_method_is_wrapped_once_with_the_configured_ddp_options(recording_ddp):
    """One wrapper around the whole method, with find_unused_parameters as configured and no device ids on the
    CPU; the parameters the method averages itself are handed to DDP to ignore; the step's function is rebuilt
    over the wrapper, so each step's forward goes through it."""
    method = _AveragingMethod()
    cfg = TrainConfig(find_unused_parameters=True)
    runner = StepRunner(method, [torch.optim.SGD(method.parameters(), lr=1.0)], cfg, torch.device("cpu"))
    before = runner.loss_function()
    runner.wrap_distributed(DistContext(rank=0, world_size=2), cfg)
    assert recording_ddp.made == [(method, None, True)] and recording_ddp.ignored == [(method, ["v"])]
    assert isinstance(runner.model, RecordingDDP) and runner.model.module is method and runner.method is method
    assert runner.world_size == 2 and runner._losses is None
    assert runner.loss_function() is not before
    runner.step(torch.tensor([1.0, -2.0]), None, 0)
    assert recording_ddp.forwards == [4]  # images, labels, epoch, scalars


def test_a_cuda_wrap_names_its_device_and_ignores_nothing_unasked(recording_ddp):
    method = _LinearMethod()  # no ddp_ignored_parameters
    cfg = TrainConfig()
    StepRunner(method, [], cfg, torch.device("cuda", 1)).wrap_distributed(DistContext(rank=1, world_size=2), cfg)
    assert recording_ddp.made == [(method, [1], False)] and recording_ddp.ignored == []


def test_sync_bn_converts_the_methods_batch_norms_before_the_wrap(recording_ddp):
    """train.sync_bn=true on CUDA devices: every BatchNorm becomes a SyncBatchNorm (converted on the CPU here; a
    CUDA device object only), and the converted method is the one wrapped."""
    method = _LinearMethod()
    method.bn = torch.nn.BatchNorm1d(2)
    cfg = TrainConfig(sync_bn=True)
    runner = StepRunner(method, [], cfg, torch.device("cuda", 0))
    runner.wrap_distributed(DistContext(rank=0, world_size=2), cfg)
    assert isinstance(runner.method.bn, torch.nn.SyncBatchNorm)
    assert recording_ddp.made == [(runner.method, [0], False)]


# ---------------------------------------------------------------- CUDA switches and compilation (stand-ins)
_CUDA_SWITCHES = (
    (torch.backends.cuda.matmul, "allow_tf32"),
    (torch.backends.cudnn, "allow_tf32"),
    (torch.backends.cudnn, "benchmark"),
)


@pytest.fixture
def cuda_switches():
    """The process-wide CUDA switches, restored after the test (monkeypatch cannot restore torch's cuBLAS module)."""
    saved = [getattr(module, name) for module, name in _CUDA_SWITCHES]
    yield _CUDA_SWITCHES
    for (module, name), value in zip(_CUDA_SWITCHES, saved, strict=True):
        setattr(module, name, value)


@pytest.mark.parametrize(
    "tf32, benchmark, deterministic, expected",
    [(True, True, False, (True, True, True)), (False, True, True, (False, False, False)),
     (True, False, False, (True, True, False))],
)  # fmt: skip
def test_cuda_backends_take_tf32_and_autotuning_from_the_config(
    cuda_switches, tf32, benchmark, deterministic, expected
):
    """TF32 matmuls and convolutions as train.tf32 says; cuDNN autotuning when asked and not deterministic; a CPU
    run leaves every switch as it is."""
    for (module, name), value in zip(cuda_switches, expected, strict=True):
        setattr(module, name, not value)
    cfg = TrainConfig(tf32=tf32, cudnn_benchmark=benchmark, deterministic=deterministic)
    configure_backends(cfg, torch.device("cpu"))
    assert tuple(getattr(module, name) for module, name in cuda_switches) == tuple(not v for v in expected)
    configure_backends(cfg, torch.device("cuda", 0))
    assert tuple(getattr(module, name) for module, name in cuda_switches) == expected


def test_reduce_overhead_marks_a_new_cuda_graph_step_before_each_compiled_step(monkeypatch):
    """Inductor's reduce-overhead: each step is marked as a new CUDA-graph step before the compiled function runs;
    other modes and backends get the compiled function itself, with mode for inductor, else the backend."""
    compiled_with, marks = [], []

    def fake_compile(fn, **options):
        compiled_with.append(options)
        return lambda *args: (args, len(marks))

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(True))
    graphs = compile_loss_function(lambda *args: None, "reduce-overhead", "inductor", fullgraph=True)
    assert compiled_with == [{"fullgraph": True, "mode": "reduce-overhead"}]
    assert graphs(1, 2, 3, 4) == ((1, 2, 3, 4), 1) and graphs(5, 6, 7, 8) == ((5, 6, 7, 8), 2)
    assert compile_loss_function(lambda *args: None, "default")(1, 2, 3, 4) == ((1, 2, 3, 4), 2)
    assert compile_loss_function(lambda *args: None, "reduce-overhead", "aot_eager")(1, 2, 3, 4)[1] == 2
    assert compiled_with[1:] == [{"fullgraph": False, "mode": "default"}, {"fullgraph": False, "backend": "aot_eager"}]


class _Tapped(torch.nn.Module):
    """A network exposing forward_taps, as okd's networks do."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x)

    def forward_taps(self, x):
        return self.fc(x), []


def test_compile_of_a_stepwise_method_compiles_each_networks_forwards(monkeypatch):
    """A method that steps its optimizers itself has each network exposing forward_taps compiled (the module and
    its forward_taps), with the mode for inductor, else the backend; no other module, and nothing for a method
    whose whole step is compiled or without train.compile."""
    compiled = []

    def fake_compile(fn, **options):
        compiled.append((getattr(fn, "__name__", ""), options))
        return ("compiled", fn)

    monkeypatch.setattr(torch, "compile", fake_compile)
    method = _ManualMethod()
    method.nets = torch.nn.ModuleList([_Tapped(), _Tapped()])
    taps = [net.forward_taps for net in method.nets]
    assert prepare_method(method, TrainConfig(compile=True, compile_mode="max-autotune")) is method
    assert compiled == [("_call_impl", {"mode": "max-autotune"}), ("forward_taps", {"mode": "max-autotune"})] * 2
    assert [net.forward_taps for net in method.nets] == [("compiled", t) for t in taps]
    compiled.clear()
    prepare_method(_ManualMethod(), TrainConfig(compile=True), compile_backend="aot_eager")
    other = _ManualMethod()
    other.net = _Tapped()
    prepare_method(other, TrainConfig(compile=True), compile_backend="aot_eager")
    assert compiled == [("_call_impl", {"backend": "aot_eager"}), ("forward_taps", {"backend": "aot_eager"})]
    compiled.clear()
    whole = _LinearMethod()
    whole.net = _Tapped()
    prepare_method(whole, TrainConfig(compile=True))
    prepare_method(other, TrainConfig(compile=False))
    assert compiled == []


def test_fp16_steps_go_through_the_grad_scaler_updated_after_each_call():
    """The scaler unscales the gradients before the step and is updated after each call (a second step before an
    update is refused by torch); a step with an inf gradient is skipped and the scale backs off."""
    method = _LinearMethod()
    runner = StepRunner(method, [torch.optim.SGD(method.parameters(), lr=1.0)], TrainConfig(precision="fp16"),
                        torch.device("cpu"))  # fmt: skip
    x = torch.tensor([1.0, -2.0])
    for _ in range(2):
        runner.zero_grad()
        runner.backward((method.w * x).sum())
        runner.step_optimizer()
    assert torch.equal(method.w.detach(), -2 * x) and runner.scaler.get_scale() == 65536.0
    runner.zero_grad()
    runner.backward((method.w * torch.tensor([float("inf"), 0.0])).sum())
    runner.step_optimizer(0)
    assert torch.equal(method.w.detach(), -2 * x) and runner.scaler.get_scale() == 32768.0


# ------------------------------------------------------------------------------ an empty epoch, device sync
def test_an_epoch_without_a_batch_is_refused_with_the_fix():
    refused = r"^the training split yielded no batch; lower data\.batch_size or set data\.drop_last=false$"
    with pytest.raises(ConfigError, match=refused):
        epoch_module.train_epoch(_Runner(), _batches([]), 0, _train_cfg(), DistContext())


def test_sync_waits_for_a_cuda_device_only(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)
    epoch_module.sync(torch.device("cpu"))
    epoch_module.sync(torch.device("cuda", 1))
    assert waited == [torch.device("cuda", 1)]


# ------------------------------------------------------------------- the collectives of several processes
def test_the_collectives_of_several_processes_go_through_the_process_group(monkeypatch):
    """Sum all-reduce in place, an object gathered from each of the world's ranks, the barrier, and the process
    group destroyed at shutdown only when there is one."""
    calls = []

    def all_gather_object(out, obj):
        calls.append(("gather", list(out)))
        out[:] = [(rank, obj) for rank in range(len(out))]

    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, op: calls.append(("sum", op)) or t.mul_(3))
    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append(("barrier",)))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    three = DistContext(rank=1, world_size=3)
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t, three) is t and t.tolist() == [3.0, 6.0]
    assert all_gather_objects("x", three) == [(0, "x"), (1, "x"), (2, "x")]
    barrier(three)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    shutdown(three)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    shutdown(three)
    shutdown(DistContext())
    assert calls == [("sum", torch.distributed.ReduceOp.SUM), ("gather", [None] * 3), ("barrier",), ("destroy",)]


# --------------------------------------------------------------------------- stopping, teachers, summaries
def test_sigterm_stops_the_run_through_a_keyboard_interrupt_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StopRequested) as stopped:
        with _GracefulStop():
            assert signal.getsignal(signal.SIGTERM) == _GracefulStop._handler
            os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) == before


def test_a_run_outside_the_main_thread_keeps_the_sigterm_handler():
    """signal.signal works in the main thread only: elsewhere the stop is left to the default handling, and
    leaving the block restores nothing."""
    before, seen, errors = signal.getsignal(signal.SIGTERM), [], []

    def run():
        try:
            with _GracefulStop() as stop:
                seen.append((stop._old, signal.getsignal(signal.SIGTERM)))
        except Exception as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == [] and seen == [(None, before)] and signal.getsignal(signal.SIGTERM) == before


def test_a_teacher_given_as_a_folder_is_refused_and_a_file_of_its_own_read_as_it_is(tmp_path):
    def cfg(path):
        return SimpleNamespace(method_params=SimpleNamespace(teacher_checkpoint=str(path)))

    refused = (
        rf"^method\.teacher_checkpoint={tmp_path} is a folder; give the teacher run's deploy\.pt \({tmp_path}/deploy"
    )
    with pytest.raises(ConfigError, match=refused):
        _check_teacher_file(cfg(tmp_path))
    (tmp_path / "last.pt").write_bytes(b"not read")
    for name in ("teacher.pt", "sub/deploy.pt"):  # another name; a deploy.pt without its run's last.pt
        assert _check_teacher_file(cfg(tmp_path / name)) is None
    assert _check_teacher_file(SimpleNamespace(method_params=SimpleNamespace())) is None


def test_a_resume_that_changes_the_cohort_says_so():
    one, two = {"model": {"members": ["a"]}}, {"model": {"members": ["a", "b"]}}
    assert _members_note(one, one) == "" and _members_note({"model": {}}, {"model": {}}) == ""
    assert _members_note(one, two) == (
        " The cohort changed: model.members=['a'] in the run, ['a', 'b'] asked; the restored weights are the run's "
        "own networks'."
    )
    assert _members_note({"model": {}}, one).startswith(" The cohort changed: model.members=unset in the run, ['a']")
    assert _members_note(one, {"model": {}}).startswith(" The cohort changed: model.members=['a'] in the run, unset")


def test_the_summary_of_a_run_with_no_scored_epoch_says_so(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="okd"):
        _log_summary(tmp_path, [{"epoch": 1, "train/loss": 0.5}], None, 5.0)
    assert caplog.messages == [f"{tmp_path}: no epoch was scored on the test split yet (train.eval_every)"]


def test_a_compiled_runner_compiles_its_step_function_once_as_configured(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled.append(options) or fn)
    cfg = TrainConfig(compile=True, compile_mode="max-autotune")
    runner = StepRunner(
        _LinearMethod(), [], cfg, torch.device("cpu"), compile_backend="inductor", compile_fullgraph=True
    )
    assert runner.loss_function() is runner.loss_function()
    assert compiled == [{"fullgraph": True, "mode": "max-autotune"}]


def test_a_run_is_named_after_its_recipe_only_where_it_is_not_the_methods_own():
    assert run_stem(load_config("cifar100/dml_resnet32")) == "cifar100_dml_resnet32"
    assert run_stem(load_config("cifar100/dml_resnet32", ["recipe=ffsd"])) == "cifar100_dml_resnet32_ffsd"
    assert run_stem(load_config("cifar100/ffsd_resnet32", ["recipe=ffsd"])) == "cifar100_ffsd_resnet32"


def test_an_interactive_epoch_line_is_written_above_the_bars(monkeypatch):
    """With bars on screen the epoch line goes through tqdm.write to stderr (not the log, which would break them)."""
    written = []
    monkeypatch.setattr(trainer_module, "interactive", lambda progress: True)
    monkeypatch.setattr(trainer_module.tqdm, "write", lambda line, file=None: written.append((line, file)))
    row = {
        "epoch": 1,
        "train/loss": 0.5,
        "test/net/top1": 10.0,
        "test/net/top5": 50.0,
        "time/epoch_s": 2.0,
        "time/images_per_s": 9.0,
    }
    _report_epoch(row, "bar", 3, "net", 4.0, {})
    assert written == [(epoch_line(row, ["net"], 3, "net", 4.0, {}), sys.stderr)]
