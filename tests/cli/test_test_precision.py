"""``okd test`` scores as training scored: under the run's precision (bf16 autocast here) by default, so the
figure the training log printed for the last epoch is the figure ``okd test`` prints; ``--precision fp32`` says
that it differs from training's."""

from __future__ import annotations

import re

import helpers
import pytest

from okd.cli import main
from okd.engine.trainer import train
from okd.errors import ConfigError
from okd.methods.build import load_config
from okd.report.scoring import score_checkpoint
from okd.runs.metrics import read_metrics_csv


@pytest.fixture(scope="module")
def bf16_run(cifar10_root, tmp_path_factory):
    settings = {
        "data.limit_train": 32,
        "data.batch_size": 16,
        "data.limit_test": 200,
        "data.test_batch_size": 100,
        "train.precision": "bf16",
        "train.progress": "log",
        "seed": 5,
    }
    overrides = helpers.quick_overrides(cifar10_root, tmp_path_factory.mktemp("runs"), "bf16", 1, settings)
    return train(load_config("cifar10/baseline_resnet20", overrides))


def test_okd_test_prints_the_figure_training_printed(bf16_run, capsys):
    logged = read_metrics_csv(bf16_run / "metrics.csv")[-1]["test/net/top1"]
    metrics, info = score_checkpoint(bf16_run)
    assert metrics["net/top1"] == logged and info["precision"] == "bf16" == info["run_precision"]
    deploy_metrics, _ = score_checkpoint(bf16_run / "deploy.pt")
    assert deploy_metrics["net/top1"] == logged
    assert main(["test", str(bf16_run)]) == 0
    out = capsys.readouterr().out
    assert "evaluated under bf16, the run's precision" in out
    assert re.search(rf"^\*net\s+{logged:.2f}\s", out, re.M)


def test_training_log_and_okd_test_print_the_same_last_epoch_figure(cifar10_root, tmp_path, capsys):
    settings = {"data.limit_train": 32, "data.batch_size": 16, "data.limit_test": 200, "data.test_batch_size": 100}
    settings |= {"train.precision": "bf16", "train.progress": "log", "seed": 5}
    run = train(
        load_config("cifar10/baseline_resnet20", helpers.quick_overrides(cifar10_root, tmp_path, "r", 1, settings))
    )
    printed = re.search(r"epoch 1/1: .* top1 \[\*net=([0-9.]+)\]", capsys.readouterr().err).group(1)
    assert main(["test", str(run)]) == 0
    assert re.search(rf"^\*net\s+{printed}\s", capsys.readouterr().out, re.M)


def test_fp32_is_labelled_as_differing_from_training(bf16_run, capsys):
    metrics, info = score_checkpoint(bf16_run, precision="fp32")
    assert info["precision"] == "fp32" and info["run_precision"] == "bf16"
    assert main(["test", str(bf16_run), "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "evaluated under fp32 (--precision); training scored its epochs under bf16" in out
    assert re.search(rf"^\*net\s+{metrics['net/top1']:.2f}\s", out, re.M)
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        score_checkpoint(bf16_run, precision="fp16")


def test_okd_test_evaluates_under_the_same_autocast_as_training(cifar10_root, tmp_path, monkeypatch):
    """The figures of a barely trained network may agree by chance in both precisions; what each evaluation ran
    under is recorded instead: training's and ``okd test``'s are the same bf16 autocast, ``--precision fp32`` none."""
    import torch

    from okd.engine import evaluate as evaluate_mod
    from okd.engine import trainer as trainer_mod
    from okd.report import scoring as scoring_mod

    seen: list[tuple[str, bool, torch.dtype]] = []

    def recording(where):
        def wrapped(method, loader, *args, **kwargs):
            seen.append((where, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return evaluate_mod.evaluate(method, loader, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(trainer_mod, "evaluate", recording("train"))
    monkeypatch.setattr(scoring_mod, "evaluate", recording("test"))
    settings = {"data.limit_train": 16, "data.batch_size": 16, "data.limit_test": 16, "train.precision": "bf16"}
    run = train(
        load_config("cifar10/baseline_resnet20", helpers.quick_overrides(cifar10_root, tmp_path, "a", 1, settings))
    )
    score_checkpoint(run)
    score_checkpoint(run / "deploy.pt")
    score_checkpoint(run, precision="fp32")
    assert seen[:3] == [("train", True, torch.bfloat16), ("test", True, torch.bfloat16), ("test", True, torch.bfloat16)]
    assert seen[3][:2] == ("test", False)
