"""Faults against the run folder: a process stopped (SIGKILL, SIGTERM) at every boundary of the epoch-end save,
divergence, a second writer, a full disk, unwritable folders; each run compared with an uninterrupted one.

The stops use the test hook of okd/runs/store.py (``OKD_FAULT_AT=<before|after>:<file>:<epoch>:<SIGNAL>``)
in a forked child (no second torch import), which then dies by the signal as a real run would.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

import helpers
import pytest
import torch

from okd.cli import main
from okd.io import load_checkpoint
from okd.runs.metrics import read_metrics_csv
from okd.runs.store import BEST_BACKUP, FAULT_ENV, LOCK_NAME, UNCOMMITTED

pytestmark = pytest.mark.slow  # every test here trains, stops and resumes real runs

CONFIG = "cifar10/baseline_resnet20"
RUN = Path("runs/run")  # relative: config.yaml is then the same for every run of these tests
FILES = ("metrics.csv", "best.pt", "deploy.pt", "last.pt")


def args(root: Path, epochs: int = 2, **extra: object) -> list[str]:
    settings = {
        "data.limit_train": 64,
        "data.limit_test": 32,
        "data.batch_size": 32,
        "data.test_batch_size": 32,
        "seed": 0,
    } | extra
    return ["train", CONFIG, *helpers.quick_overrides(root, Path("runs"), "run", epochs, settings)]


def one_line(text: str) -> str:
    """A CLI message with its line wrapping undone."""
    return " ".join(text.split())


def _snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run folder and its bytes (to show a reader wrote nothing)."""
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


class _Log:
    """The okd log lines of a block (the okd logger does not propagate to pytest's capture)."""

    def __init__(self):
        self.lines: list[str] = []

    def __enter__(self):
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.lines.append(record.getMessage())
        logging.getLogger("okd").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger("okd").removeHandler(self.handler)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def fork_okd(argv: list[str], fault: str, log_path: Path, wait: bool = True) -> int:
    """``okd argv`` in a forked child with ``OKD_FAULT_AT=fault``; its exit code (-N: killed by signal N)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        rc = 99
        try:
            os.environ[FAULT_ENV] = fault
            stream = open(log_path, "w")  # noqa: SIM115
            sys.stdout = sys.stderr = stream
            for handler in logging.getLogger("okd").handlers:
                if isinstance(handler, logging.StreamHandler):
                    handler.setStream(stream)
            rc = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(rc)
    if not wait:
        return pid
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture(scope="module")
def reference(cifar10_root, tmp_path_factory) -> Path:
    """The uninterrupted run (2 epochs, both improving, so every file is written at every epoch)."""
    cwd, previous = tmp_path_factory.mktemp("reference"), os.getcwd()
    os.chdir(cwd)
    try:
        assert main(args(cifar10_root)) == 0
    finally:
        os.chdir(previous)
    run = cwd / RUN
    best = load_checkpoint(run / "last.pt")["best"]
    assert best["epoch"] == 2, "epoch 2 must improve, or the best.pt boundaries of epoch 2 are never reached"
    return run


def _without_timings(ckpt: dict) -> dict:
    return {**ckpt, "history": helpers.comparable(ckpt["history"])}


def assert_same_folder(reference: Path, run: Path) -> None:
    """Every file as in the uninterrupted run: bitwise (config.yaml), the same tensors and values (.pt), the same
    rows (metrics.csv, whose seconds differ), and no temporary or kept-back file left."""
    assert (run / "config.yaml").read_bytes() == (reference / "config.yaml").read_bytes()
    ref_rows, rows = read_metrics_csv(reference / "metrics.csv"), read_metrics_csv(run / "metrics.csv")
    assert helpers.comparable(rows) == helpers.comparable(ref_rows)
    for name in ("last.pt", "best.pt"):
        ref, got = load_checkpoint(reference / name), load_checkpoint(run / name)
        helpers.assert_same(_without_timings(ref), _without_timings(got), name)
    helpers.assert_same(load_checkpoint(reference / "deploy.pt"), load_checkpoint(run / "deploy.pt"), "deploy.pt")
    left = sorted(p.name for p in run.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME)
    assert left == [], f"left behind: {left}"


def recover(root: Path) -> None:
    """What a user does after a stop: resume, or (nothing committed) run the same command again."""
    if (RUN / "last.pt").exists():
        assert main(["train", "--resume", str(RUN)]) == 0
    else:
        assert main(["train", "--resume", str(RUN)]) == 2
        assert main(args(root)) == 0


BOUNDARIES = [f"{when}:{name}" for name in FILES for when in ("before", "after")]
CASES = (
    [f"{b}:2:SIGKILL" for b in BOUNDARIES]  # every boundary of the last epoch's save
    + ["after:best.pt:1:SIGKILL", "before:last.pt:1:SIGKILL"]  # the first save: nothing committed yet
    + ["before:metrics.csv:1:SIGTERM", "after:best.pt:1:SIGTERM", "before:last.pt:1:SIGTERM"]  # held, whatever the
    + ["after:metrics.csv:2:SIGTERM"]  # boundary, until last.pt is written
)


@pytest.mark.parametrize("fault", CASES)
def test_stop_at_every_boundary_of_the_save_then_resume_matches(fault, reference, cifar10_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    epoch, signame = int(fault.split(":")[2]), fault.split(":")[3]
    rc = fork_okd(args(cifar10_root), fault, tmp_path / "child.log")
    log = (tmp_path / "child.log").read_text()
    if signame == "SIGKILL":
        assert rc == -signal.SIGKILL, log
        committed = epoch if fault.startswith("after:last.pt") else epoch - 1
    else:  # held until the save is complete, then the run stops: 143, naming the epoch last.pt holds
        assert rc == 143, log
        committed = epoch
        expected = "is complete" if epoch == 2 else f"stopped after epoch {epoch} (committed in last.pt)"
        assert expected in log, log
    if committed:
        assert load_checkpoint(RUN / "last.pt")["epoch"] == committed
    else:
        assert not (RUN / "last.pt").exists()
    recover(cifar10_root)
    assert_same_folder(reference, tmp_path / RUN)


def test_readers_see_the_committed_epoch_after_a_kill_in_mid_save(reference, cifar10_root, tmp_path, monkeypatch):
    """Killed after best.pt and deploy.pt of epoch 2 were renamed, before last.pt: okd test --checkpoint best and
    okd export read epoch 1 (what last.pt commits: the kept previous best.pt), not the uncommitted epoch 2, and
    leave the folder as it is; the next writer puts it back in line."""
    from okd.report.export import load_deployable
    from okd.report.scoring import score_checkpoint

    monkeypatch.chdir(tmp_path)
    assert fork_okd(args(cifar10_root), "before:last.pt:2:SIGKILL", tmp_path / "child.log") == -signal.SIGKILL
    assert load_checkpoint(RUN / "best.pt")["epoch"] == 2 and (RUN / BEST_BACKUP).exists()
    before = _snapshot(RUN)
    metrics, info = score_checkpoint(RUN, "best")
    assert info["epoch"] == 1 and info["path"] == str(RUN / BEST_BACKUP)
    assert metrics["net/top1"] == read_metrics_csv(reference / "metrics.csv")[0]["test/net/top1"]
    assert load_deployable(RUN, check=False).epoch == 1
    assert _snapshot(RUN) == before
    recover(cifar10_root)
    assert_same_folder(reference, tmp_path / RUN)


def test_finished_run_with_lagging_best_and_deploy_is_repaired_on_resume(reference, tmp_path):
    """A finished run whose best.pt and deploy.pt lag behind last.pt (what the old save order left after a kill)
    gets both back from last.pt's state on resume, instead of 'all epochs already trained' and nothing else."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "best.pt").unlink()
    stale = load_checkpoint(run / "deploy.pt")
    torch.save(
        {**stale, "epoch": 1, "state_dict": {k: v * 0 for k, v in stale["state_dict"].items()}}, run / "deploy.pt"
    )
    assert main(["train", "--resume", str(run / "last.pt")]) == 0  # a checkpoint file names its folder
    assert_same_folder(reference, run)


def test_a_best_epoch_that_is_gone_is_refused_not_scored(reference, tmp_path):
    """best.pt lagging behind a best epoch older than last.pt cannot be rebuilt: okd test says so."""
    from okd.errors import CheckpointError
    from okd.report.scoring import score_checkpoint

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    last = load_checkpoint(run / "last.pt")
    torch.save({**last, "best": {**last["best"], "epoch": 1}}, run / "last.pt")  # best is epoch 1 ...
    (run / "best.pt").unlink()  # ... whose weights are gone
    with pytest.raises(CheckpointError, match="best epoch is 1, whose weights are no longer on disk"):
        score_checkpoint(run, "best")
    assert score_checkpoint(run, "last")[1]["epoch"] == 2


def test_second_writer_is_refused_and_the_lock_dies_with_its_holder(reference, cifar10_root, tmp_path, monkeypatch):
    """A run frozen (SIGSTOP) in its epoch-2 save holds the folder: a second `okd train` of the same folder (another
    seed) and a resume are refused and change nothing; after kill -9 of the holder the folder is free again."""
    monkeypatch.chdir(tmp_path)
    pid = fork_okd(args(cifar10_root), "before:deploy.pt:2:SIGSTOP", tmp_path / "child.log", wait=False)
    try:
        _, status = os.waitpid(pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        before = {p.name: p.read_bytes() for p in RUN.iterdir()}
        err = tmp_path / "err.txt"
        with open(err, "w") as f, contextlib.redirect_stderr(f):
            assert main(args(cifar10_root, seed=1)) == 2
            assert main(["train", "--resume", str(RUN)]) == 2
        assert one_line(err.read_text()).count("is being written by another okd process") == 2
        assert {p.name: p.read_bytes() for p in RUN.iterdir()} == before
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    recover(cifar10_root)
    assert_same_folder(reference, tmp_path / RUN)


def test_divergence_stops_the_run_and_keeps_the_good_files(cifar10_root, tmp_path, monkeypatch, capsys):
    """Early divergence (lr 1e20): nothing is committed. Late divergence (lr x 1e20 from epoch 3): the run stops
    with the good epochs intact, best.pt at a good epoch; nothing non-finite is on disk either way."""
    monkeypatch.chdir(tmp_path)
    assert main(args(cifar10_root, **{"optim.lr": 1e20})) == 2
    err = one_line(capsys.readouterr().err)
    assert "not finite" in err and "No epoch was committed" in err
    assert sorted(p.name for p in RUN.iterdir()) == [LOCK_NAME, UNCOMMITTED, "config.yaml"]

    shutil.rmtree(RUN)
    late = {"optim.milestones": "[2]", "optim.gamma": 1e20, "train.epochs": 3}
    assert main(args(cifar10_root, **late)) == 2
    err = one_line(capsys.readouterr().err)
    assert "epoch 3" in err and "not finite" in err and "holds epoch 2" in err
    last, best, deploy = (load_checkpoint(RUN / n) for n in ("last.pt", "best.pt", "deploy.pt"))
    assert last["epoch"] == 2 and best["epoch"] == last["best"]["epoch"] <= 2 and deploy["epoch"] == 2
    for record in (last["method"], best["method"], deploy["state_dict"]):
        assert all(torch.isfinite(v).all() for v in record.values() if v.is_floating_point())
    assert [r["epoch"] for r in read_metrics_csv(RUN / "metrics.csv")] == [1, 2]


def test_nan_weights_with_a_finite_loss_are_never_committed(cifar10_root, tmp_path, monkeypatch, capsys):
    """The weights are checked, not only the loss: a weight turned NaN after epoch 2's steps (every loss finite, the
    NaN logits scored as wrong) stops the run before that epoch is saved; epoch 1 stays committed, all finite."""
    import okd.engine.trainer as trainer

    real_epoch = trainer.train_epoch

    def poisoned(runner, loader, epoch, *a, **k):
        row = real_epoch(runner, loader, epoch, *a, **k)
        if epoch == 1:
            with torch.no_grad():
                weight = next(runner.method.parameters())
                weight[(0,) * weight.dim()] = float("nan")
        return row

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer, "train_epoch", poisoned)
    assert main(args(cifar10_root)) == 2
    err = one_line(capsys.readouterr().err)
    assert "epoch 2: " in err and "is not finite" in err and "holds epoch 1" in err
    last, deploy = load_checkpoint(RUN / "last.pt"), load_checkpoint(RUN / "deploy.pt")
    assert last["epoch"] == 1 and deploy["epoch"] == 1
    assert [r["epoch"] for r in read_metrics_csv(RUN / "metrics.csv")] == [1]
    for record in (last["method"], deploy["state_dict"]):
        assert all(torch.isfinite(v).all() for v in record.values() if v.is_floating_point())


def test_disk_full_while_saving_says_what_is_intact(reference, cifar10_root, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing deploy.pt of epoch 2 (best.pt of epoch 2 already renamed): one message, the epoch-1
    commit intact (best.pt put back), no temporary left; resume after the disk has room matches."""
    monkeypatch.chdir(tmp_path)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if obj.get("format") == "okd-deploy-v1" and obj.get("epoch") == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(args(cifar10_root)) == 2
    monkeypatch.setattr(torch, "save", real_save)
    err = one_line(capsys.readouterr().err)
    assert "No space left on device" in err and "holds epoch 1" in err and "Traceback" not in err
    assert load_checkpoint(RUN / "last.pt")["epoch"] == 1 and load_checkpoint(RUN / "best.pt")["epoch"] == 1
    assert not list(RUN.glob(".*.tmp"))
    recover(cifar10_root)
    assert_same_folder(reference, tmp_path / RUN)


def test_stop_before_the_first_commit_does_not_offer_a_resume(cifar10_root, tmp_path, monkeypatch):
    """SIGTERM during epoch 1: exit 143, and the message says there is nothing to resume."""
    import okd.engine.trainer as trainer
    from okd.errors import StopRequested

    def terminated(*a, **k):
        raise StopRequested(signal.SIGTERM)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer, "train_epoch", terminated)
    with _Log() as log:
        assert main(args(cifar10_root)) == 143
    assert "nothing to resume" in log.text and "--resume" not in log.text


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_unwritable_output_dir_is_refused_before_data_is_read(kind, tmp_path, monkeypatch, capsys):
    """An output_dir that is a file, or read-only, is reported before data and models are built (the data root
    does not even exist here)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("not a folder")
    else:
        out.mkdir()
        out.chmod(0o555)
        if os.geteuid() == 0:  # root writes anywhere: stand in for the kernel's refusal
            real_mkdir = Path.mkdir

            def refuse(self, *a, **k):
                if self.parent == out:
                    raise PermissionError(errno.EACCES, "Permission denied", str(self))
                return real_mkdir(self, *a, **k)

            monkeypatch.setattr(Path, "mkdir", refuse)
    argv = [
        "train",
        CONFIG,
        f"output_dir={out}",
        "name=run",
        f"data.root={tmp_path / 'no-data'}",
        "data.download=false",
    ]
    assert main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert "cannot write the run folder" in err and "no-data" not in err
    if kind == "read-only":
        assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------------------ the reading side
def test_every_reader_answers_from_the_commit_between_metrics_and_last(reference, cifar10_root, tmp_path, monkeypatch):
    """Killed after metrics.csv, best.pt and deploy.pt of epoch 2 were renamed, before last.pt: okd test (last and
    best, the folder and its files), report, plot, export and predict answer from epoch 1, the history stops at
    epoch 1, and no reader writes a byte (the next writer repairs the folder)."""
    from okd.report.export import load_deployable
    from okd.report.predict import load_predictor
    from okd.report.scoring import score_checkpoint
    from okd.report.tables import read_run
    from okd.runs.reader import Run

    monkeypatch.chdir(tmp_path)
    assert fork_okd(args(cifar10_root), "before:last.pt:2:SIGKILL", tmp_path / "child.log") == -signal.SIGKILL
    assert len(read_metrics_csv(RUN / "metrics.csv")) == 2 and load_checkpoint(RUN / "deploy.pt")["epoch"] == 2
    before = _snapshot(RUN)
    epoch1 = read_metrics_csv(reference / "metrics.csv")[0]["test/net/top1"]
    run = Run(RUN)
    assert run.epoch == 1 and [int(r["epoch"]) for r in run.history] == [1]
    for target, which in ((RUN, "last"), (RUN, "best"), (RUN / "best.pt", "last"), (RUN / "deploy.pt", "last")):
        metrics, info = score_checkpoint(target, which)
        assert info["epoch"] == 1 and metrics["net/top1"] == epoch1, (target, which)
    result = read_run(RUN)
    assert result.epochs_done == 1 and result.final["net/top1"] == epoch1
    assert load_deployable(RUN, check=False).epoch == 1
    assert load_deployable(RUN / "deploy.pt", check=False).epoch == 1
    assert load_predictor(RUN).epoch == 1
    assert _snapshot(RUN) == before, "a reader wrote into the run folder"
    recover(cifar10_root)
    assert_same_folder(reference, tmp_path / RUN)


def test_concurrent_readers_agree_after_a_kill_in_mid_save(reference, cifar10_root, tmp_path, monkeypatch):
    """Three okd predict processes at once on a folder killed before its last.pt rename answer from the same,
    committed epoch (readers take no lock and never repair, so none can see another half-way)."""
    monkeypatch.chdir(tmp_path)
    assert fork_okd(args(cifar10_root), "before:last.pt:2:SIGKILL", tmp_path / "child.log") == -signal.SIGKILL
    image = tmp_path / "image.png"
    pytest.importorskip("PIL.Image").new("RGB", (32, 32), (120, 30, 200)).save(image)
    pids = [fork_okd(["predict", str(RUN), str(image)], "", tmp_path / f"predict{i}.log", wait=False) for i in range(3)]
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    logs = [(tmp_path / f"predict{i}.log").read_text() for i in range(3)]
    assert codes == [0, 0, 0], logs
    assert len(set(logs)) == 1 and "epoch 1" in logs[0], logs


def test_results_without_a_commit_are_refused_by_every_reader(reference, cifar10_root, tmp_path, monkeypatch, capsys):
    """Killed in the first save after best.pt and deploy.pt were written, before any last.pt: okd test (folder, best,
    deploy.pt), export and predict refuse, saying that nothing is committed; no traceback."""
    monkeypatch.chdir(tmp_path)
    assert fork_okd(args(cifar10_root), "before:last.pt:1:SIGKILL", tmp_path / "child.log") == -signal.SIGKILL
    assert (RUN / "deploy.pt").exists() and (RUN / "best.pt").exists() and not (RUN / "last.pt").exists()
    for argv in (
        ["test", str(RUN)],
        ["test", str(RUN), "--checkpoint", "best"],
        ["test", str(RUN / "deploy.pt")],
        ["test", str(RUN / "best.pt")],
        ["export", str(RUN), "--format", "state_dict"],
        ["predict", str(RUN), str(RUN / "config.yaml")],
        ["report", str(RUN)],
    ):
        assert main(argv) == 2, argv
        err = one_line(capsys.readouterr().err)
        assert "no committed epoch" in err and "Traceback" not in err, (argv, err)


def test_a_foreign_last_pt_is_refused_by_every_reader(reference, tmp_path, capsys):
    """A last.pt of another run (another seed) copied into the folder: test, report and export refuse it as resume
    does, and nothing is mixed with the folder's own files."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    last = load_checkpoint(run / "last.pt")
    torch.save({**last, "config": {**last["config"], "seed": 7}}, run / "last.pt")
    for argv in (["test", str(run)], ["report", str(run)], ["export", str(run), "--format", "state_dict"],
                 ["train", "--resume", str(run)]):  # fmt: skip
        assert main(argv) == 2, argv
        err = one_line(capsys.readouterr().err)
        assert "does not belong to the run" in err and "seed 7" in err, (argv, err)


def test_a_run_whose_last_pt_was_lost_is_never_emptied(reference, cifar10_root, tmp_path, monkeypatch, capsys):
    """A finished run whose last.pt was deleted: `okd train` with the same name refuses, naming what the folder
    holds, and deletes nothing."""
    monkeypatch.chdir(tmp_path)
    RUN.parent.mkdir()
    shutil.copytree(reference, RUN)
    (RUN / "last.pt").unlink()
    before = _snapshot(RUN)
    assert main(args(cifar10_root)) == 2
    err = one_line(capsys.readouterr().err)
    assert "holds results of an earlier run" in err and "metrics.csv, best.pt, deploy.pt" in err
    assert _snapshot(RUN) == before


def test_a_deleted_lock_file_does_not_let_a_second_writer_commit(reference, cifar10_root, tmp_path, monkeypatch):
    """A run frozen in its epoch-2 save; its .okd.lock is deleted (a cleanup script) and a resume takes a new lock
    and finishes. The frozen writer, continued, refuses to commit over it (exit 2) and the folder is the resumed
    run's, the same as an uninterrupted one."""
    monkeypatch.chdir(tmp_path)
    pid = fork_okd(args(cifar10_root), "before:metrics.csv:2:SIGSTOP", tmp_path / "child.log", wait=False)
    _, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    try:
        (RUN / LOCK_NAME).unlink()
        assert main(["train", "--resume", str(RUN)]) == 0
    finally:
        os.kill(pid, signal.SIGCONT)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    log = one_line((tmp_path / "child.log").read_text())
    assert code == 2 and "was deleted or replaced while this run was writing" in log, log
    assert_same_folder(reference, tmp_path / RUN)


@pytest.mark.parametrize("name", ["last.pt", "deploy.pt"])
@pytest.mark.parametrize("damage", ["empty", "folder"])
def test_an_empty_or_folder_shaped_file_gets_okds_message(name, damage, reference, tmp_path, capsys):
    """A 0-byte or folder-shaped last.pt is refused with okd's message by resume and test; a damaged deploy.pt is
    a lagging file: readers rebuild the committed one from last.pt, and resume rewrites it."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / name).unlink()
    if damage == "empty":
        (run / name).touch()
    else:
        (run / name).mkdir()
    if name == "last.pt":
        for argv in (["train", "--resume", str(run)], ["test", str(run)]):
            assert main(argv) == 2
            err = one_line(capsys.readouterr().err)
            want = "is empty (0 bytes)" if damage == "empty" else "is a folder, not a file"
            assert want in err and "Traceback" not in err, err
        return
    from okd.report.export import load_deployable

    assert load_deployable(run, check=False).epoch == 2
    assert main(["test", str(run)]) == 0
    capsys.readouterr()
    if damage == "folder":
        (run / name).rmdir()
    assert main(["train", "--resume", str(run)]) == 0
    assert load_checkpoint(run / "deploy.pt")["epoch"] == 2


def test_a_stop_during_start_up_says_what_the_folder_holds(reference, cifar10_root, tmp_path, monkeypatch):
    """Ctrl-C while the data is read: exit 130 with the stop message (a new run: nothing to resume; a resume: the
    committed epoch and the resume command)."""
    import okd.engine.trainer as trainer

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer, "build_loaders", interrupted)
    with _Log() as log:
        assert main(args(cifar10_root)) == 130
    assert "nothing to resume" in log.text
    RUN.parent.mkdir(exist_ok=True)
    shutil.rmtree(RUN, ignore_errors=True)
    shutil.copytree(reference, RUN)
    with _Log() as log:
        assert main(["train", "--resume", str(RUN), "train.epochs=3"]) == 130
    assert "stopped after epoch 2 (committed in last.pt)" in log.text and "--resume" in log.text


def test_a_kd_teacher_deploy_that_lags_its_run_is_refused(reference, cifar10_root, tmp_path, monkeypatch, capsys):
    """KD's teacher given as a run's deploy.pt is read as that run commits it: a deploy.pt a stop left one epoch
    behind last.pt is refused before any data is read, naming the fix; in line, it trains."""
    monkeypatch.chdir(tmp_path)
    teacher = tmp_path / "teacher"
    shutil.copytree(reference, teacher)
    kd = ["method.name=kd", "method.teacher_model=resnet20", f"method.teacher_checkpoint={teacher / 'deploy.pt'}"]
    stale = load_checkpoint(teacher / "deploy.pt")
    torch.save({**stale, "epoch": 1}, teacher / "deploy.pt")
    assert main([*args(cifar10_root, epochs=1), *kd]) == 2
    err = one_line(capsys.readouterr().err)
    assert "does not hold the epoch its run commits" in err and f"okd train --resume {teacher}" in err, err
    assert not RUN.exists()
    torch.save(stale, teacher / "deploy.pt")
    assert main([*args(cifar10_root, epochs=1), *kd]) == 0
