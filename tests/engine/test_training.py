"""End to end on a real CIFAR-10 subset: run folder, okd test, exact resume (also after kill -9), bad input."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
import torch

from okd.cli import main
from okd.engine.trainer import config_from_run, train
from okd.io import load_checkpoint
from okd.methods.build import load_config
from okd.report.scoring import score_checkpoint
from okd.runs.metrics import read_metrics_csv

pytestmark = pytest.mark.slow  # every test here trains real runs end to end

CONFIG = "cifar10/baseline_resnet20"


def quick(root: Path, out: Path, name: str, epochs: int = 3, **extra: str) -> list[str]:
    settings = {
        "data.limit_train": 384,
        "data.limit_test": 200,
        "data.batch_size": 32,
        "data.test_batch_size": 100,
        "optim.milestones": "[2]",
        "train.progress": "log",
        "train.device": "cpu",
        "seed": 7,
    }
    return helpers.quick_overrides(root, out, name, epochs, settings | extra)


@pytest.fixture(scope="module")
def reference_run(cifar10_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return train(load_config(CONFIG, quick(cifar10_root, out, "reference")))


def test_run_folder_has_every_file(reference_run):
    for name in ("config.yaml", "metrics.csv", "last.pt", "best.pt", "deploy.pt"):
        assert (reference_run / name).is_file(), name
    rows = read_metrics_csv(reference_run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in (
        "train/net/ce",
        "train/loss",
        "test/net/top1",
        "test/net/top5",
        "lr/net",
        "time/epoch_s",
        "time/images_per_s",
    ):
        assert key in rows[0], key
    assert rows[0]["lr/net"] == pytest.approx(0.1) and rows[-1]["lr/net"] == pytest.approx(0.01)
    best = load_checkpoint(reference_run / "best.pt")
    assert best["selected_on"] == "test" and "optimistic" in best["note"]
    deploy = load_checkpoint(reference_run / "deploy.pt")
    from okd.models import create_model

    create_model(deploy["model"], deploy["num_classes"]).load_state_dict(deploy["state_dict"])


def test_okd_test_reproduces_logged_accuracy(reference_run, capsys):
    metrics, _ = score_checkpoint(reference_run)
    last = read_metrics_csv(reference_run / "metrics.csv")[-1]
    assert metrics["net/top1"] == last["test/net/top1"]
    assert metrics["net/top5"] == last["test/net/top5"]
    assert main(["test", str(reference_run)]) == 0
    assert f"{last['test/net/top1']:.2f}" in capsys.readouterr().out


def test_resume_is_bitwise_exact(reference_run, cifar10_root, tmp_path):
    first = train(load_config(CONFIG, quick(cifar10_root, tmp_path, "split", epochs=2)))
    resumed = train(config_from_run(first, ["train.epochs=3"]), run_dir=first, resume=True)
    helpers.assert_same_runs(reference_run, resumed)


# The child runs ``okd train`` with StepRunner.step wrapped: after its 3rd step of epoch 3 it writes a marker and
# stops there, so the kill lands mid-epoch (after real in-memory progress past the last save) on any machine.
KILL_CHILD = """
import pathlib, sys, time
from okd.engine.step import StepRunner
marker, calls, step = pathlib.Path(sys.argv[1]), [], StepRunner.step
def paused_step(self, images, labels, epoch):
    out = step(self, images, labels, epoch)
    calls.append(epoch)
    if calls.count(2) == 3:
        marker.write_text("mid-epoch 3")
        time.sleep(600)
    return out
StepRunner.step = paused_step
from okd.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill_9_mid_epoch_then_resume_matches(reference_run, cifar10_root, tmp_path):
    marker, run = tmp_path / "mid_epoch_3", tmp_path / "killed"
    child = [sys.executable, "-c", KILL_CHILD, str(marker)]
    cmd = [*child, "train", CONFIG, *quick(cifar10_root, tmp_path, "killed")]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # bitwise needs the same thread count
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if not marker.exists():
            why = "timeout" if proc.poll() is None else proc.stderr.read().decode()[-2000:]
            pytest.fail(f"the run never reached epoch 3: {why}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert [r["epoch"] for r in read_metrics_csv(run / "metrics.csv")] == [1, 2]
    assert main(["train", "--resume", str(run)]) == 0
    helpers.assert_same_runs(reference_run, run)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_bad_inputs_fail_cleanly_without_damage(reference_run, cifar10_root, tmp_path, capsys):
    before = _digest(reference_run)
    # resume with a config of another model
    assert main(["train", "cifar10/baseline_wrn16_2", "--resume", str(reference_run)]) == 2
    assert helpers.mentions(capsys.readouterr().err, "cannot resume")
    # starting a new run over an existing one
    args = ["train", CONFIG, *quick(cifar10_root, reference_run.parent, "reference")]
    assert main(args) == 2
    assert helpers.mentions(capsys.readouterr().err, "--resume")
    assert _digest(reference_run) == before
    # missing data folder, config typo, negative epochs
    assert main(["train", CONFIG, *quick(tmp_path / "nowhere", tmp_path, "a")]) == 2
    assert helpers.mentions(capsys.readouterr().err, "nowhere")
    assert main(["train", CONFIG, "train.epochz=3"]) == 2
    assert helpers.mentions(capsys.readouterr().err, "epochs")
    assert main(["train", CONFIG, "train.epochs=-2"]) == 2
    assert helpers.mentions(capsys.readouterr().err, "positive")
    # corrupt pickle
    broken = tmp_path / "broken"
    shutil.copytree(cifar10_root, broken)
    batch = broken / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:1000])
    assert main(["train", CONFIG, *quick(broken, tmp_path, "b")]) == 2
    assert helpers.mentions(capsys.readouterr().err, "data_batch_1")
    # corrupt checkpoint
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "last.pt").write_bytes(b"not a checkpoint")
    assert main(["test", str(corrupt)]) == 2
    assert helpers.mentions(capsys.readouterr().err, "cannot be read")


def test_tensorboard_logging_writes_every_epoch(cifar10_root, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from okd.engine.tensorboard import TensorBoardLogger

    closed = []
    real_close = TensorBoardLogger.close
    monkeypatch.setattr(TensorBoardLogger, "close", lambda self, *a: closed.append(self) or real_close(self, *a))

    overrides = quick(
        cifar10_root, tmp_path, "board", epochs=2, **{"train.tensorboard": "true", "train.max_steps_per_epoch": "2"}
    )
    run = train(load_config(CONFIG, overrides))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("test/net/top1")] == [1, 2]
    assert "train/net/ce" in events.Tags()["scalars"]
    assert len(closed) == 1  # the writer is closed when the run ends


# --------------------------------------------------------------------- what an epoch records (tiny runs)
def tiny(root: Path, out: Path, name: str, epochs: int) -> list[str]:
    """40 training images in batches of 16: two full batches and a last one of 8."""
    settings = {"data.limit_train": 40, "data.batch_size": 16, "data.limit_test": 16, "data.test_batch_size": 16}
    return helpers.quick_overrides(root, out, name, epochs, {**settings, "seed": 3})


def test_best_checkpoint_is_the_first_epoch_with_the_top_score(cifar10_root, tmp_path, monkeypatch):
    """Scores 50, 70, 70, 60: best.pt is epoch 2 (1-based, as in metrics.csv; a tie does not replace it).
    (The patched hook reads ``scores`` when called, so rebinding it scripts the next run.)"""
    from okd.methods.baseline import Baseline

    scores = iter([50.0, 70.0, 70.0, 60.0])
    monkeypatch.setattr(Baseline, "derived_metrics", lambda self, metrics: {"net/top1": next(scores)})
    run = train(load_config(CONFIG, tiny(cifar10_root, tmp_path, "ties", epochs=4)))
    assert [r["test/net/top1"] for r in read_metrics_csv(run / "metrics.csv")] == [50.0, 70.0, 70.0, 60.0]
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert last["best"]["epoch"] == 2 and last["best"]["top1"] == 70.0
    assert best["epoch"] == 2 and len(best["history"]) == 2
    # a first epoch that scores 0 % is still the best so far (best.pt exists from epoch 1 on)
    scores = iter([0.0])
    zero = train(load_config(CONFIG, tiny(cifar10_root, tmp_path, "zero", epochs=1)))
    assert load_checkpoint(zero / "best.pt")["epoch"] == 1 and load_checkpoint(zero / "last.pt")["best"]["top1"] == 0.0


def test_epoch_means_are_per_image_and_speed_counts_images(cifar10_root, tmp_path, monkeypatch):
    from okd.engine.step import StepRunner

    seen: list[tuple[int, float, float]] = []
    real_step = StepRunner.step

    def recording_step(self, images, labels, epoch):
        losses, total = real_step(self, images, labels, epoch)
        seen.append((labels.shape[0], total.item(), losses["net/ce"].item()))
        return losses, total

    from okd.engine import trainer as trainer_mod

    paces: list[list[float]] = []
    real_eta = trainer_mod.run_eta
    monkeypatch.setattr(trainer_mod, "run_eta", lambda p, left: paces.append(list(p)) or real_eta(p, left))
    monkeypatch.setattr(StepRunner, "step", recording_step)
    run = train(load_config(CONFIG, tiny(cifar10_root, tmp_path, "means", epochs=1)))
    row = read_metrics_csv(run / "metrics.csv")[0]
    assert paces == [[pytest.approx(row["time/epoch_s"] + row["time/eval_s"], rel=1e-8)]]  # ETA pace: train + eval
    assert [n for n, _, _ in seen] == [16, 16, 8]
    assert row["train/loss"] == pytest.approx(sum(n * t for n, t, _ in seen) / 40, rel=1e-7)
    assert row["train/net/ce"] == pytest.approx(sum(n * c for n, _, c in seen) / 40, rel=1e-7)
    assert row["train/loss"] != pytest.approx(sum(t for _, t, _ in seen) / 3, rel=1e-7)  # not a mean of batches
    assert row["time/images_per_s"] * row["time/epoch_s"] == pytest.approx(40, rel=1e-6)


def test_resume_restores_the_random_states(cifar10_root, tmp_path, monkeypatch):
    """The python, numpy and torch generators continue where the saved epoch left them (dropout, random
    choices of a method); here every step draws from each, so a restart from the seed would differ."""
    import random

    import numpy as np

    from okd.engine.seeding import rng_state
    from okd.engine.step import StepRunner

    states: list[dict] = []
    real_step = StepRunner.step

    def drawing_step(self, images, labels, epoch):
        states.append(rng_state())
        torch.rand(3), random.random(), np.random.rand(3)
        return real_step(self, images, labels, epoch)

    monkeypatch.setattr(StepRunner, "step", drawing_step)
    run = train(load_config(CONFIG, tiny(cifar10_root, tmp_path, "rng", epochs=1)))
    saved = load_checkpoint(run / "last.pt")["rng_per_rank"][0]
    assert states[0]["python"] != saved["python"]  # the steps drew: the saved state is not the seed's
    states.clear()
    train(config_from_run(run, ["train.epochs=2"]), run_dir=run, resume=True)
    helpers.assert_same(states[0], saved, "rng")  # the generators at the first step after resuming
