"""``okd test`` scores as training scored: under the run's precision (bf16 autocast here) by default, so the
figure the training log printed for the last epoch is the figure ``okd test`` prints; ``--precision fp32`` says
that it differs from training's."""

from __future__ import annotations

import contextlib
import io
import re

import helpers
import pytest
import torch

from okd.cli import main
from okd.engine import evaluate as evaluate_mod
from okd.engine import trainer as trainer_mod
from okd.engine.trainer import train
from okd.errors import ConfigError
from okd.methods.build import load_config
from okd.report import scoring as scoring_mod
from okd.report.scoring import score_checkpoint
from okd.runs.metrics import read_metrics_csv

#: what each evaluation ran under: (where, autocast enabled on the CPU, autocast dtype)
SEEN: list[tuple[str, bool, torch.dtype]] = []


def recording(where: str):
    def wrapped(method, loader, *args, **kwargs):
        SEEN.append((where, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return evaluate_mod.evaluate(method, loader, *args, **kwargs)

    return wrapped


@pytest.fixture(scope="module")
def bf16_run(cifar10_root, tmp_path_factory):
    """One bf16 epoch, its log (stderr) kept, every evaluation recorded (training's and okd test's)."""
    settings = {
        "data.limit_train": 32,
        "data.batch_size": 16,
        "data.limit_test": 100,
        "data.test_batch_size": 100,
        "train.precision": "bf16",
        "train.progress": "log",
        "seed": 5,
    }
    overrides = helpers.quick_overrides(cifar10_root, tmp_path_factory.mktemp("runs"), "bf16", 1, settings)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_mod, "evaluate", recording("train"))
        mp.setattr(scoring_mod, "evaluate", recording("test"))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            run = train(load_config("cifar10/baseline_resnet20", overrides))
        yield run, err.getvalue()


def test_okd_test_prints_the_figure_training_printed(bf16_run, capsys):
    run, log = bf16_run
    printed = re.search(r"epoch 1/1: .* top1 \[\*net=([0-9.]+)\]", log).group(1)
    logged = read_metrics_csv(run / "metrics.csv")[-1]["test/net/top1"]
    assert printed == f"{logged:.2f}"
    metrics, info = score_checkpoint(run)
    assert metrics["net/top1"] == logged and info["precision"] == "bf16" == info["run_precision"]
    assert score_checkpoint(run / "deploy.pt")[0]["net/top1"] == logged
    assert main(["test", str(run)]) == 0
    out = capsys.readouterr().out
    assert "evaluated under bf16, the run's precision" in out
    assert re.search(rf"^\*net\s+{printed}\s", out, re.M)


def test_okd_test_evaluates_under_the_same_autocast_as_training(bf16_run):
    """The figures of a barely trained network may agree by chance in both precisions; what each evaluation ran
    under is recorded instead: training's and ``okd test``'s are the same bf16 autocast, ``--precision fp32`` none."""
    run, _ = bf16_run
    SEEN[1:] = []
    score_checkpoint(run)
    score_checkpoint(run / "deploy.pt")
    score_checkpoint(run, precision="fp32")
    assert SEEN[:3] == [("train", True, torch.bfloat16), ("test", True, torch.bfloat16), ("test", True, torch.bfloat16)]
    assert SEEN[3][:2] == ("test", False) and len(SEEN) == 4


def test_fp32_is_labelled_as_differing_from_training(bf16_run, capsys):
    run, _ = bf16_run
    metrics, info = score_checkpoint(run, precision="fp32")
    assert info["precision"] == "fp32" and info["run_precision"] == "bf16"
    assert main(["test", str(run), "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "evaluated under fp32 (--precision); training scored its epochs under bf16" in out
    assert re.search(rf"^\*net\s+{metrics['net/top1']:.2f}\s", out, re.M)
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        score_checkpoint(run, precision="fp16")
