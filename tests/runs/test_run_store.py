"""The run store's parts: held signals, the folder lock, file modes, stale temporaries, non-finite checks."""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading
from pathlib import Path

import pytest
import torch
import tqdm
from torch import nn

from okd.engine.evaluate import evaluate
from okd.errors import ConfigError, RunFolderError, StopRequested
from okd.methods.build import build_method, load_config
from okd.runs.records import BEST_NOTE, best_record, deploy_record, device_label, first_nonfinite
from okd.runs.store import LOCK_NAME, UNCOMMITTED, RunStore, deferred_signals


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
    # Ctrl-C as in a terminal, also when the tests run in the background (where SIGINT starts out ignored)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    steps = []
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            with deferred_signals():
                signal.raise_signal(signum)
                steps.append("the save went on")
            steps.append("not reached")
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
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


def test_a_failed_start_in_an_existing_folder_removes_only_the_lock_file_it_made(tmp_path):
    """In a folder that was there before, a store that wrote nothing removes the lock file it created and keeps
    the folder, and a lock file it found stays."""
    run = tmp_path / "run"
    run.mkdir()
    RunStore(run).lock().release()
    assert run.is_dir() and not (run / LOCK_NAME).exists()
    (run / LOCK_NAME).touch()
    RunStore(run).lock().release()
    assert (run / LOCK_NAME).exists()


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


def test_evaluation_stops_after_max_batches_and_its_bar_counts_only_those():
    """max_batches=2 of 3 batches: the third (every label wrong) is never scored, and the bar on stderr (left
    behind by nobody) counts 2 batches."""
    bars = []

    def bar(iterable, **kw):
        bars.append(kw)
        return iterable

    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])
    right, wrong = torch.tensor([1, 1]), torch.tensor([0, 0])
    loader = [(torch.zeros(2), right), (torch.zeros(2), right), (torch.zeros(2), wrong)]
    assert evaluate(_Fixed(logits), loader, max_batches=2) == {"net/top1": 100.0, "net/top5": 100.0}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tqdm, "tqdm", bar)
        assert evaluate(_Fixed(logits), loader, max_batches=2, progress=True)["net/top1"] == 100.0
        assert evaluate(_Fixed(logits), loader, progress=True)["net/top1"] == pytest.approx(200 / 3)
    assert bars == [{"total": n, "desc": "eval", "leave": False, "file": sys.stderr} for n in (2, 3)]


def test_evaluation_of_no_image_scores_nothing():
    """A split that yields no image (an empty batch) gives no scores rather than a division by zero."""
    empty = [(torch.zeros(0, 3, 2, 2), torch.zeros(0, dtype=torch.long))]
    assert evaluate(_Fixed(torch.zeros(0, 3)), empty) == {}


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


# ------------------------------------------------------------------ the guards behind the promises, one by one
def _epochs(run: Path) -> dict[str, int | None]:
    from okd.runs.records import epoch_of

    return {name: epoch_of(run / name) for name in ("best.pt", "deploy.pt", "last.pt")}


def _rows(run: Path) -> int:
    from okd.runs.metrics import read_metrics_csv

    return len(read_metrics_csv(run / "metrics.csv"))


def test_a_deleted_lock_file_stops_the_save_before_its_first_rename(tmp_path):
    """The writer checks, before every rename, that the file it locked is still the folder's .okd.lock."""
    run = tmp_path / "run"
    with RunStore(run).lock() as store:
        store.begin(_Config(), None, lambda: {})
        store.commit(*records(1))
        (run / LOCK_NAME).unlink()
        with pytest.raises(RunFolderError, match=r"\.okd\.lock was deleted or replaced .* without saving epoch 2"):
            store.commit(*records(2))
    assert _epochs(run) == {"best.pt": 1, "deploy.pt": 1, "last.pt": 1} and _rows(run) == 1
    assert not list(run.glob(".*.tmp"))


def test_a_lock_file_replaced_before_the_flock_is_locked_again(tmp_path, monkeypatch):
    """A lock file that another process replaced between our open and our flock is not what we hold: the writer
    locks the file on disk instead, so a second writer opening it is refused."""
    import fcntl

    from okd.runs import store as store_mod

    run = tmp_path / "run"
    run.mkdir()
    real, calls = fcntl.flock, []

    def flock(fd, op):
        if not calls:  # the first flock: someone replaces .okd.lock just before it
            (run / LOCK_NAME).unlink()
            (run / LOCK_NAME).touch()
        calls.append(fd)
        return real(fd, op)

    monkeypatch.setattr(store_mod.fcntl, "flock", flock)
    store = RunStore(run).lock(create=False)
    monkeypatch.undo()
    try:
        assert len(calls) == 2 and store._holds_lock_file()
        with pytest.raises(RunFolderError, match="being written by another okd process"):
            RunStore(run).lock(create=False)
    finally:
        store.release()


@pytest.fixture
def sigterm_stops():
    """SIGTERM raises StopRequested, as in a training run (okd.engine.trainer), for the test's duration."""

    def stop(signum, frame):
        raise StopRequested(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    yield
    signal.signal(signal.SIGTERM, previous)


def _renames(monkeypatch, fault: str | None = None) -> list[str]:
    """The names the store renames into place, in order; with ``fault``, SIGTERM is sent to this process at that
    boundary of the save (``<before|after>:<file>:<epoch>``, okd/runs/store.py's test hook)."""
    from okd import io as okd_io
    from okd.runs.store import FAULT_ENV

    if fault is not None:
        monkeypatch.setenv(FAULT_ENV, f"{fault}:SIGTERM")
    renamed: list[str] = []
    real = okd_io.os.replace

    def replace(src, dst):
        real(src, dst)
        renamed.append(os.path.basename(dst))

    monkeypatch.setattr(okd_io.os, "replace", replace)
    return renamed


def test_a_stop_in_mid_save_is_held_until_last_pt_is_renamed(tmp_path, monkeypatch, sigterm_stops):
    run = tmp_path / "run"
    with RunStore(run).lock() as store:
        store.begin(_Config(), None, lambda: {})
        renamed = _renames(monkeypatch, "after:metrics.csv:1")
        with pytest.raises(StopRequested):
            store.commit(*records(1))
        assert renamed == ["metrics.csv", "best.pt", "deploy.pt", "last.pt"]
        assert store.committed_epoch == 1 and not (run / UNCOMMITTED).exists()


def test_a_stop_while_a_run_opens_is_held_until_config_yaml_is_written(tmp_path, monkeypatch, sigterm_stops):
    run = tmp_path / "run"
    with RunStore(run).lock() as store:
        renamed = _renames(monkeypatch, f"after:{UNCOMMITTED}:0")
        with pytest.raises(StopRequested):
            store.begin(_Config(), None, lambda: {})
        assert renamed == [UNCOMMITTED, "config.yaml"]


def test_a_stop_while_a_resume_repairs_the_folder_is_held_until_it_is_in_line(tmp_path, monkeypatch, sigterm_stops):
    run = tmp_path / "run"
    with RunStore(run).lock() as store:
        store.begin(_Config(), None, lambda: {})
        store.commit(*records(1))
        last, _, deploy = records(2)
        last["best"] = {"epoch": 2, "top1": 1.0}
        _renames(monkeypatch, "after:metrics.csv:2")
        with pytest.raises(StopRequested):
            store.reconcile(last, lambda: deploy)
    assert _epochs(run) == {"best.pt": 2, "deploy.pt": 2, "last.pt": 1} and _rows(run) == 2


def test_the_commit_renames_last_pt_last_and_keeps_the_previous_best_until_then(tmp_path, monkeypatch):
    from okd.runs import store as store_mod
    from okd.runs.store import BEST_BACKUP

    run = tmp_path / "run"
    with RunStore(run).lock() as store:
        store.begin(_Config(), None, lambda: {})
        store.commit(*records(1))
        renamed = _renames(monkeypatch)
        kept = []
        real_save = store_mod.atomic_save

        def save(obj, path, on_boundary=None):
            kept.append((path.name, store_mod.epoch_of(run / BEST_BACKUP)))
            real_save(obj, path, on_boundary)

        monkeypatch.setattr(store_mod, "atomic_save", save)
        store.commit(*records(2))
    assert renamed == ["metrics.csv", "best.pt", "deploy.pt", "last.pt"]
    assert kept == [("best.pt", 1), ("deploy.pt", 1), ("last.pt", 1)]  # epoch 1's best.pt kept until the commit
    assert not (run / BEST_BACKUP).exists() and _epochs(run) == {"best.pt": 2, "deploy.pt": 2, "last.pt": 2}


def test_a_filesystem_without_hard_links_commits_without_the_best_backup(tmp_path, monkeypatch):
    """The previous best.pt is kept by a hard link; where the filesystem has none, the save goes on without it."""
    import errno

    from okd.runs import store as store_mod
    from okd.runs.store import BEST_BACKUP

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    run = tmp_path / "run"
    with RunStore(run).lock() as store:
        store.begin(_Config(), None, lambda: {})
        store.commit(*records(1))
        monkeypatch.setattr(store_mod.os, "link", no_links)
        store.commit(*records(2))
    assert not (run / BEST_BACKUP).exists() and _epochs(run) == {"best.pt": 2, "deploy.pt": 2, "last.pt": 2}


def test_a_failed_save_puts_the_previous_best_back_and_says_what_is_intact(tmp_path, monkeypatch):
    import errno

    from okd.runs import store as store_mod

    run = tmp_path / "run"
    with RunStore(run).lock() as store:
        store.begin(_Config(), None, lambda: {})
        store.commit(*records(1))
        real_save = store_mod.atomic_save

        def full(obj, path, on_boundary=None):
            if path.name == "deploy.pt":
                raise OSError(errno.ENOSPC, "No space left on device")
            real_save(obj, path, on_boundary)

        monkeypatch.setattr(store_mod, "atomic_save", full)
        with pytest.raises(RunFolderError) as info:
            store.commit(*records(2))
    msg = str(info.value)
    assert msg.startswith("saving epoch 2 into") and "(No space left on device); nothing of it was committed" in msg
    assert "The folder holds epoch 1, committed in last.pt, intact." in msg and "okd train --resume" in msg
    assert _epochs(run) == {"best.pt": 1, "deploy.pt": 1, "last.pt": 1} and store.committed_epoch == 1


def test_a_new_run_is_marked_until_its_first_commit(tmp_path):
    """The mark goes down before anything else, an attempt that never committed is cleared by the next start, the
    first commit removes the mark, and a resume of a run stopped right after that commit removes it too."""
    run = tmp_path / "run"
    with RunStore(run).lock() as store:
        store.begin(_Config(), None, lambda: {})
        assert (run / UNCOMMITTED).is_file()
        (run / "deploy.pt").write_bytes(b"an attempt's file")
    with RunStore(run).lock(create=False) as store:
        store.begin(_Config(), None, lambda: {})
        assert not (run / "deploy.pt").exists() and (run / UNCOMMITTED).is_file()
        store.commit(*records(1))
        assert not (run / UNCOMMITTED).exists()
    (run / UNCOMMITTED).write_text("left by a stop right after the first commit\n")
    last, _, deploy = records(1)
    with RunStore(run).lock(create=False) as store:
        store.begin(_Config(), last, lambda: deploy)
    assert not (run / UNCOMMITTED).exists()


@pytest.mark.parametrize("found", ["metrics.csv", "best.pt", "deploy.pt"])
def test_results_without_the_mark_or_last_pt_are_never_deleted(tmp_path, found):
    run = tmp_path / "run"
    run.mkdir()
    (run / found).write_bytes(b"a committed result")
    with RunStore(run).lock(create=False) as store:
        with pytest.raises(ConfigError, match=rf"holds results of an earlier run \({found}\) but no last.pt"):
            store.begin(_Config(), None, lambda: {})
        with pytest.raises(ConfigError, match="okd does not delete results to start over"):
            store.refuse_orphaned_results()
    assert (run / found).read_bytes() == b"a committed result" and not (run / UNCOMMITTED).exists()


def test_resume_puts_every_file_back_in_line_with_last_pt(tmp_path):
    """A stop after last.pt of epoch 2 was renamed (the others lag, or ran ahead of an older commit): metrics.csv,
    deploy.pt and best.pt are rewritten from it; a best epoch kept as .best.pt.prev is put back; one whose weights
    are gone is reported, not invented."""
    from okd.runs.store import BEST_BACKUP

    run = tmp_path / "run"
    with RunStore(run).lock() as store:
        store.begin(_Config(), None, lambda: {})
        store.commit(*records(1))
        last, _, deploy = records(2)
        assert store.reconcile(last, lambda: deploy) == ["metrics.csv", "deploy.pt", "best.pt"]
        assert _epochs(run) == {"best.pt": 2, "deploy.pt": 2, "last.pt": 1} and _rows(run) == 2
        assert store.reconcile(last, lambda: deploy) == []  # in line: nothing to do
        # best.pt of an uncommitted epoch 3, the committed best (epoch 2) kept beside it
        os.link(run / "best.pt", run / BEST_BACKUP)
        store._save({"epoch": 3}, "best.pt", 3)
        assert store.reconcile(last, lambda: deploy) == ["best.pt"]
        assert _epochs(run)["best.pt"] == 2 and not (run / BEST_BACKUP).exists()
        older = {**last, "best": {"epoch": 1, "top1": 1.0}}
        assert store.reconcile(older, lambda: deploy) == ["best.pt lost"]
        assert _epochs(run)["best.pt"] == 2  # left as it is


def test_accuracy_is_over_every_process_images(monkeypatch):
    """Under DDP the hit counts and the image count are both summed over the processes: two ranks that score
    alike give the single-process accuracy (not twice it)."""
    from okd.engine import evaluate as evaluate_mod

    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [0.0, 5.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 0])
    alone = evaluate(_Fixed(logits), [(torch.zeros(4, 3, 2, 2), labels)])
    monkeypatch.setattr(evaluate_mod, "all_reduce_sum", lambda packed, dist: packed * 2)  # a twin rank
    assert (
        evaluate(_Fixed(logits), [(torch.zeros(4, 3, 2, 2), labels)]) == alone == {"net/top1": 75.0, "net/top5": 100.0}
    )


class _TwoHeads(nn.Module):
    """A 'method' with two heads and an oracle over both."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.a, self.b = a, b

    def eval_outputs(self, images):
        return {"a": self.a, "b": self.b}

    def oracle_groups(self):
        return {"oracle_any": ["a", "b"]}


def test_the_oracle_counts_an_image_any_head_gets_right():
    """a is right on images 0, 1; b on 1, 2; neither on 3: a, b 50 %, the oracle 75 % (not an ensemble)."""
    right, wrong = [5.0, 0.0], [0.0, 5.0]
    a = torch.tensor([right, right, wrong, wrong])
    b = torch.tensor([wrong, right, right, wrong])
    metrics = evaluate(_TwoHeads(a, b), [(torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.long))])
    assert metrics == {"a/top1": 50.0, "a/top5": 100.0, "b/top1": 50.0, "b/top5": 100.0, "oracle_any/top1": 75.0}


def test_a_store_that_is_not_the_writer_writes_nothing(tmp_path):
    """Under torchrun only rank 0 writes: the other ranks' stores take no lock, make no folder, write no file,
    and only follow the committed epoch."""
    run = tmp_path / "run"
    store = RunStore(run, writer=False).lock()
    assert not run.exists()
    store.begin(_Config(), None, lambda: {})
    store.commit(*records(1))
    store.release()
    assert not run.exists() and store.committed_epoch == 1
    with RunStore(run).lock():  # rank 0 holds the folder; another rank's store opens it all the same
        RunStore(run, writer=False).lock().release()


def test_the_best_epoch_of_a_history_is_its_first_top_score():
    from okd.runs.metrics import best_in_history

    history = [{"epoch": 1, "test/h/top1": 3.0}, {"epoch": 2, "test/h/top1": 7.0}, {"epoch": 3, "test/h/top1": 7.0}]
    assert best_in_history(history, "h") == (7.0, 2)
    assert best_in_history(history, "other") is None and best_in_history([], "h") is None


def test_evaluation_runs_without_autograd_in_eval_mode_and_restores_the_mode():
    seen = []

    class Recording(_Fixed):
        def eval_outputs(self, images):
            seen.append((torch.is_grad_enabled(), self.training))
            return super().eval_outputs(images)

    method = Recording(torch.tensor([[1.0, 0.0]])).train()
    evaluate(method, [(torch.zeros(1, 3, 2, 2), torch.tensor([0]))] * 2)
    assert seen == [(False, False), (False, False)] and method.training and torch.is_grad_enabled()


def test_releasing_an_unused_folder_tolerates_a_lock_file_already_gone(tmp_path):
    """A store that made the folder and wrote nothing removes both on release, even when its lock file was deleted
    meanwhile (a cleanup script): no error from the release itself."""
    run = tmp_path / "run"
    store = RunStore(run).lock()
    (run / LOCK_NAME).unlink()
    store.release()
    assert not run.exists()


def test_tracker_ids_are_kept_outside_the_record_and_cleared_by_a_new_run(tmp_path, caplog):
    from okd.runs.tracker_ids import TRACKERS_FILE, read_tracker_ids

    with RunStore(tmp_path / "run").lock() as store:
        store.begin(_Config(), None, lambda: {})
        store.record_tracker_ids({"mlflow": {"run_id": "abc"}})
        store.record_tracker_ids({"wandb": {"run_id": "xyz"}})
        assert read_tracker_ids(store.dir) == {"mlflow": {"run_id": "abc"}, "wandb": {"run_id": "xyz"}}
    RunStore(tmp_path / "run", writer=False).record_tracker_ids({"mlflow": {"run_id": "other"}})  # a DDP rank > 0
    assert read_tracker_ids(tmp_path / "run")["mlflow"] == {"run_id": "abc"}
    (tmp_path / "run" / TRACKERS_FILE).write_text("{not json")
    assert read_tracker_ids(tmp_path / "run") == {}  # unreadable: the trackers start new runs, nothing breaks
    (tmp_path / "run" / TRACKERS_FILE).write_text('[{"run_id": "abc"}]')
    assert read_tracker_ids(tmp_path / "run") == {}  # not an object of trackers
    (tmp_path / "run" / TRACKERS_FILE).write_text('{"mlflow": {"run_id": 7}, "wandb": "x", "tb": {"run_id": "t"}}')
    assert read_tracker_ids(tmp_path / "run") == {"tb": {"run_id": "t"}}  # entries without a string id left out
    with RunStore(tmp_path / "run").lock(create=False) as store:
        store.begin(_Config(), None, lambda: {})  # a new run in the folder (no epoch was committed)
    assert not (tmp_path / "run" / TRACKERS_FILE).exists()


def test_a_tracker_id_that_cannot_be_written_is_logged_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    from okd.runs import store as store_mod

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with RunStore(tmp_path / "run").lock() as store:
        monkeypatch.setattr(store_mod, "atomic_write_text", full_disk)
        with caplog.at_level("WARNING", logger="okd"):
            store.record_tracker_ids({"mlflow": {"run_id": "abc"}})
    assert "could not write trackers.json (No space left on device)" in caplog.text


def test_outside_the_main_thread_the_block_runs_unprotected():
    """Python installs signal handlers only in the main thread: elsewhere the block runs as it is, the handlers
    untouched, and leaving it raises nothing."""
    before = signal.getsignal(signal.SIGTERM)
    seen: list = []

    def body():
        try:
            with deferred_signals():
                seen.append(signal.getsignal(signal.SIGTERM))
            seen.append("left")
        except BaseException as exc:  # reported to the main thread
            seen.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before, "left"] and signal.getsignal(signal.SIGTERM) == before


def test_a_file_in_the_way_or_a_missing_folder_to_resume_is_refused_by_name(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError) as info:
        RunStore(tmp_path / "file").lock()
    where = str(tmp_path / "file")
    assert str(info.value) == f"{where!r} is a file, not a run folder; choose another output_dir or name"
    with pytest.raises(RunFolderError) as info:
        RunStore(tmp_path / "missing").lock(create=False)
    assert str(info.value) == f"run folder {str(tmp_path / 'missing')!r} does not exist; nothing to resume"
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("missing", [os.W_OK, os.X_OK])
def test_a_folder_the_process_cannot_write_is_refused_and_its_lock_descriptor_closed(tmp_path, monkeypatch, missing):
    """The lock file opens (as it may for root, or on a read-only bind), but the folder lacks the write or the
    search permission: refused before any lock is taken, the lock file's descriptor closed."""
    run = tmp_path / "run"
    run.mkdir()
    real_open, real_close = os.open, os.close
    opened: list[int] = []
    closed: list[int] = []

    def open_(path, *args, **kwargs):
        opened.append(real_open(path, *args, **kwargs))
        return opened[-1]

    def close(fd):
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "close", close)
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & missing)
    with pytest.raises(RunFolderError) as info:
        RunStore(run).lock(create=False)
    monkeypatch.undo()
    assert str(info.value) == (
        f"cannot write the run folder {str(run)!r} (Permission denied); "
        "choose a writable output_dir (output_dir=...) or another name"
    )
    assert len(opened) == 1 and closed == opened


def test_the_device_label_names_the_gpu(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: asked.append(device) or "NVIDIA Test GPU")
    assert device_label(torch.device("cuda", 1)) == "cuda (NVIDIA Test GPU)"
    assert asked == [torch.device("cuda", 1)]
    assert device_label(torch.device("cpu")) == "cpu" and len(asked) == 1


def test_a_state_without_floating_values_has_no_nonfinite_tensor():
    """Integer, empty and non-tensor entries are never checked (an empty tensor has no value to be NaN)."""
    assert first_nonfinite({"steps": torch.tensor(4), "empty": torch.zeros(0), "lr": float("nan")}) is None
    assert first_nonfinite({}) is None


def test_best_pt_notes_the_scored_epochs_when_only_some_were_scored():
    """train.eval_every scores some epochs: best.pt says which it was chosen among; every epoch scored: the note
    alone."""
    rows = [{"epoch": e, "train/loss": 1.0} | ({"test/net/top1": float(e)} if e % 2 == 0 else {}) for e in (1, 2, 3, 4)]
    best = best_record({"epoch": 4, "history": rows})
    assert best["note"] == f"{BEST_NOTE}; chosen among the scored epochs 2, 4 (train.eval_every)"
    assert best["scored_epochs"] == [2, 4] and best["selected_on"] == "test" and best["epoch"] == 4
    every = best_record({"epoch": 2, "history": [{"epoch": 1, "test/net/top1": 1.0}, {"epoch": 2, "test/x/top5": 1.0}]})
    assert every["note"] == BEST_NOTE and every["scored_epochs"] == [1, 2]


@pytest.mark.parametrize(
    ("overrides", "model", "head"),
    [
        (["method.name=dml", "model.members=[resnet20,wrn16_2]", "method.deploy_net=1"], "wrn16_2", "net1"),
        (["model.members=[wrn16_2]"], "wrn16_2", None),  # a cohort of one: baseline names no head
        (["method.name=kdcl", "method.models=[resnet20,wrn16_2]", "model.name=wrn16_2"], "wrn16_2", None),
        (["method.name=dml", "model.name=resnet20"], "resnet20", None),
    ],
)
def test_deploy_pt_of_a_members_cohort_describes_the_deployed_member_and_names_its_head(overrides, model, head):
    """``model.members``: the deployed member's name and spec, and the head that scored it; KDCL's method.models
    or copies of model.name: the member without a head (the model section tells it)."""
    cfg = load_config(None, overrides)
    record = deploy_record(cfg, build_method(cfg, 10), 3)
    assert record["model"] == model and record["model_spec"]["name"] == model and record.get("head") == head
    assert ("head" in record) == (head is not None)
    assert record["epoch"] == 3 and record["num_classes"] == 10
