"""The heartbeat: off a terminal a step line every ``train.log_every_steps`` steps or ``log_every_seconds``
seconds (never for an epoch's last step, whose epoch line follows), and the trackers' per-step scalars."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import helpers
import torch

from okd.engine.epoch import heartbeat
from okd.engine.heartbeat import StepReport
from okd.engine.trainer import train
from okd.methods.build import load_config


def settings(**kw) -> SimpleNamespace:
    base = {"epochs": 3, "log_every_steps": 0, "log_every_seconds": 0.0, "track_every_steps": 0}
    return SimpleNamespace(**(base | kw))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run_epoch(report: StepReport, clock: Clock, times: list[float], epoch: int = 0) -> None:
    """Steps whose total is, as the trainer hands it over, still attached to its graph: reading it must not warn
    (torch warns when a tensor that requires grad is turned into a float)."""
    report.start_epoch(epoch, len(times), paces=[])
    weight = torch.ones((), requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step, t in enumerate(times):
            clock.now = 100.0 + t
            report.after_step(step, 10 * (step + 1), weight * (2.5 - step))


def test_lines_every_n_steps_but_not_at_the_last_step(caplog):
    clock = Clock()
    report = StepReport(settings(log_every_steps=2), heartbeat=True, clock=clock)
    with caplog.at_level("INFO", logger="okd"):
        run_epoch(report, clock, [1, 2, 3, 4, 5, 6], epoch=1)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in lines] == ["epoch 2/3 step 2/6", "epoch 2/3 step 4/6"]
    assert lines[0].startswith("epoch 2/3 step 2/6: loss=1.5000, 10 img/s, run ETA ")  # 20 images in 2 s


def test_lines_every_n_seconds(caplog):
    clock = Clock()
    report = StepReport(settings(log_every_seconds=10.0), heartbeat=True, clock=clock)
    with caplog.at_level("INFO", logger="okd"):
        run_epoch(report, clock, [4, 9, 10, 15, 21, 25, 40])
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["epoch 1/3 step 3/7", "epoch 1/3 step 5/7"]


def test_no_lines_on_a_terminal_or_when_off(caplog):
    clock = Clock()
    for report in (
        StepReport(settings(log_every_steps=1, log_every_seconds=1.0), heartbeat=False, clock=clock),
        StepReport(settings(), heartbeat=True, clock=clock),
    ):
        assert not report.active
        with caplog.at_level("INFO", logger="okd"):
            run_epoch(report, clock, [1, 2, 3])
    assert caplog.records == []
    assert heartbeat("log") and heartbeat("auto")  # pytest's stderr is not a terminal
    assert not heartbeat("bar") and not heartbeat("none")


def test_per_step_tracker_scalars_at_the_global_step():
    logged = []
    trackers = SimpleNamespace(log_step=lambda metrics, step: logged.append((step, metrics)))
    clock = Clock()
    report = StepReport(settings(track_every_steps=2), False, trackers, lambda: {"lr/net": 0.1}, clock)
    run_epoch(report, clock, [1, 2, 3, 4], epoch=2)
    assert logged == [(10, {"step/loss": 1.5, "step/lr/net": 0.1}), (12, {"step/loss": -0.5, "step/lr/net": 0.1})]


def test_a_run_logged_to_a_file_prints_step_lines(cifar10_root, tmp_path, capsys):
    settings = {"data.limit_train": 40, "data.batch_size": 16, "data.limit_test": 16, "data.test_batch_size": 16}
    settings |= {"train.progress": "auto", "train.log_every_steps": 1}
    train(load_config("cifar10/baseline_resnet20", helpers.quick_overrides(cifar10_root, tmp_path, "hb", 1, settings)))
    err = capsys.readouterr().err
    assert "epoch 1/1 step 1/3: loss=" in err and "epoch 1/1 step 2/3: loss=" in err
    assert "step 3/3" not in err and "epoch 1/1: loss=" in err
