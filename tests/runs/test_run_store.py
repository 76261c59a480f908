"""The run store's parts: held signals, the folder lock, file modes, stale temporaries, non-finite checks."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from okd.engine.evaluate import evaluate
from okd.errors import RunFolderError, StopRequested
from okd.runs.records import first_nonfinite
from okd.runs.store import LOCK_NAME, RunStore, deferred_signals


def records(epoch: int) -> tuple[dict, bool, dict]:
    """(last.pt, improved, deploy.pt) records of an improving ``epoch``."""
    last = {"epoch": epoch, "history": [{"epoch": e, "test/net/top1": 1.0} for e in range(1, epoch + 1)]}
    last["best"] = {"epoch": epoch, "top1": 1.0}
    return last, True, {"format": "okd-deploy-v1", "epoch": epoch, "state_dict": {"w": torch.ones(2)}}


class _Config:
    def to_yaml(self) -> str:
        return "seed: 0\n"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_during_a_save_are_delivered_after_it(signum):
    def stop(s, frame):
        raise StopRequested(s)

    previous = signal.signal(signal.SIGTERM, stop)
    steps = []
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            with deferred_signals():
                signal.raise_signal(signum)
                steps.append("the save went on")
            steps.append("not reached")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert steps == ["the save went on"]
    assert getattr(info.value, "signum", signal.SIGINT) == signum


def test_one_writer_per_folder_and_the_lock_is_released(tmp_path):
    first = RunStore(tmp_path / "run").lock()
    with pytest.raises(RunFolderError, match="being written by another okd process"):
        RunStore(tmp_path / "run").lock()
    first.commit(*records(1))
    first.release()
    with RunStore(tmp_path / "run").lock(create=False):  # free again
        pass


def test_a_folder_made_for_a_failed_start_is_removed_again(tmp_path):
    store = RunStore(tmp_path / "run").lock()
    store.release()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_run_files_honour_the_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        with RunStore(tmp_path / "run").lock() as store:
            store.begin(_Config(), None, lambda: {})
            store.commit(*records(1))
    finally:
        os.umask(old)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == sorted([LOCK_NAME, "config.yaml", "metrics.csv", "best.pt", "deploy.pt", "last.pt"])
    for name in names:
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o666 & ~umask, name


def test_stale_temporaries_are_removed_when_a_writer_opens_the_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".last.pt.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    keep = run / "notes.txt"
    keep.write_text("mine")
    with RunStore(run).lock(create=False):
        assert not stale.exists() and keep.exists()


def test_first_nonfinite_names_the_tensor():
    state = {"a": torch.ones(3), "steps": torch.tensor(4), "b": torch.tensor([1.0, float("inf")])}
    assert first_nonfinite(state) == "b"
    assert first_nonfinite({"a": torch.ones(3)}) is None


class _Fixed(nn.Module):
    """A 'method' whose eval logits are given: NaN rows would rank class 0 first under topk."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.logits = logits

    def eval_outputs(self, images):
        return {"net": self.logits}

    def oracle_groups(self):
        return {}


def test_nonfinite_logits_never_count_as_correct():
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[nan, 0.0, 0.0], [5.0, 0.0, 0.0], [inf, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1])
    metrics = evaluate(_Fixed(logits), [(torch.zeros(4, 3, 2, 2), labels)])
    assert metrics["net/top1"] == 50.0 and metrics["net/top5"] == 50.0


def test_a_run_folder_path_given_as_its_checkpoint_file(tmp_path):
    from okd.runs.reader import run_folder_of

    (tmp_path / "last.pt").write_bytes(b"")
    assert run_folder_of(tmp_path / "last.pt") == tmp_path
    assert run_folder_of(tmp_path) == tmp_path
    assert run_folder_of(Path("runs/missing/last.pt")) == Path("runs/missing/last.pt")


def test_a_failed_write_at_the_start_is_reported_not_swallowed(tmp_path):
    """begin() that cannot write config.yaml (here a folder stands in its place) stops with okd's message."""
    with RunStore(tmp_path / "run").lock() as store:
        (tmp_path / "run" / "config.yaml").mkdir()
        with pytest.raises(RunFolderError, match=r"cannot write the run folder .*run'"):
            store.begin(_Config(), None, lambda: {})
