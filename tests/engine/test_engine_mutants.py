"""Fast unit checks of the trainer's pieces whose effect shows only in logs, resumes or later epochs."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from okd.engine.distributed import DistContext
from okd.engine.step import StepRunner
from okd.engine.trainer import _log_start, rank_rng_state
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
