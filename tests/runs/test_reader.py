"""The one reader of a run folder, okd.runs.reader.Run, on hand-made folders (fast; the fault tests in
test_faults.py stop real runs at every write boundary and read them through every command)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from okd.errors import CheckpointError
from okd.runs.metrics import metrics_csv_text
from okd.runs.reader import Run, expand_run_dirs
from okd.runs.records import CHECKPOINT_FORMAT, RUN_KEYS
from okd.runs.store import LOCK_NAME, RunStore


def _run(folder: Path, epochs: int = 2, seed: int = 0) -> Path:
    """A run folder whose last.pt commits ``epochs`` epochs (no weights: enough for the history and config)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"seed": seed, "data": {"dataset": "cifar10"}, "model": {"name": "resnet20"}}
    cfg |= {"train": {"epochs": 3}, "method": {"name": "baseline"}}
    history = [{"epoch": e, "test/net/top1": 10.0 * e} for e in range(1, epochs + 1)]
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "metrics.csv").write_text(metrics_csv_text(history))
    last = {"format": CHECKPOINT_FORMAT, "config": cfg, "epoch": epochs, "history": history, "num_classes": 10}
    last |= {"best": {"epoch": epochs, "top1": 10.0 * epochs, "head": "net"}}
    torch.save(last | {k: {} for k in RUN_KEYS if k not in last}, folder / "last.pt")
    return folder


def test_history_stops_at_the_committed_epoch(tmp_path):
    """A metrics.csv row ahead of last.pt (a stop between the two renames) is not part of the history."""
    run = _run(tmp_path / "run", epochs=1)
    ahead = [{"epoch": 1, "test/net/top1": 10.0}, {"epoch": 2, "test/net/top1": 99.0}]
    (run / "metrics.csv").write_text(metrics_csv_text(ahead))
    reader = Run(run)
    assert reader.epoch == 1 and reader.history == [{"epoch": 1, "test/net/top1": 10.0}]
    assert reader.deploy_head == "net" and reader.best_epoch == 1 and reader.epochs == 3


def test_a_folder_without_a_commit_is_refused_naming_what_it_holds(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "deploy.pt").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"no last.pt \(it holds config.yaml, deploy.pt, none of them committed\)"
    ):
        Run(run)
    with pytest.raises(CheckpointError, match="holds no committed epoch yet"):
        expand_run_dirs([run])
    with pytest.raises(CheckpointError, match="does not exist"):
        Run(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a run folder"):
        Run(tmp_path / "file")


def test_a_foreign_or_unreadable_last_pt_is_refused(tmp_path):
    run = _run(tmp_path / "run")
    last = torch.load(run / "last.pt", weights_only=True)
    torch.save({**last, "config": {**last["config"], "seed": 5}}, run / "last.pt")
    with pytest.raises(CheckpointError, match="does not belong to the run"):
        _ = Run(run).last
    torch.save({**last, "format": "something-else"}, run / "last.pt")
    with pytest.raises(CheckpointError, match="is not an okd run checkpoint"):
        _ = Run(run).last
    (run / "last.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        _ = Run(run).last


def test_a_reader_takes_no_lock_and_reads_beside_a_writer(tmp_path):
    """A writer holds the folder; a reader still answers (it never locks), and leaves no lock file behind."""
    run = _run(tmp_path / "run")
    with RunStore(run).lock(create=False):
        assert (run / LOCK_NAME).exists() and Run(run).epoch == 2
    assert not (run / LOCK_NAME).exists()  # the writer made it and wrote nothing: it is gone again
    assert Run(run).history[-1]["epoch"] == 2
    assert not (run / LOCK_NAME).exists()


def test_a_newer_commit_is_picked_up_on_refresh(tmp_path):
    run = _run(tmp_path / "run", epochs=1)
    reader = Run(run)
    assert reader.epoch == 1 and reader.refresh() is False
    _run(run, epochs=2)
    assert reader.refresh() is True and reader.epoch == 2


def test_a_best_epoch_without_its_weights_is_refused(tmp_path):
    """last.pt says the best epoch is 1, which no file holds: best is refused (last still answers)."""
    run = _run(tmp_path / "run")
    last = torch.load(run / "last.pt", weights_only=True)
    torch.save({**last, "best": {**last["best"], "epoch": 1}}, run / "last.pt")
    with pytest.raises(CheckpointError, match="whose weights are no longer on disk"):
        Run(run).checkpoint("best")
    assert Run(run).checkpoint("last")[0]["epoch"] == 2
    record, source = Run(_run(tmp_path / "other")).checkpoint("best")  # best epoch = committed: from last.pt
    assert record["epoch"] == 2 and "last.pt" in source and record["selected_on"] == "test"
