"""The run folder's files: one writer per folder, and an epoch-end save that is one commit.

A run folder holds ``config.yaml``, ``metrics.csv``, ``best.pt``, ``deploy.pt`` and ``last.pt``. At the end of
an epoch the writer saves, in this order, metrics.csv, best.pt (when the epoch improved), deploy.pt and, last,
last.pt; each file goes to a temporary file, is fsync'd and renamed over the old one, so every file is either
its old or its new version. ``last.pt`` is the commit point: its ``epoch`` is the epoch the folder holds and
says what the other files hold (deploy.pt and metrics.csv: that epoch; best.pt: ``best["epoch"]``). A process
stopped anywhere in the save (kill -9, SIGTERM, a full disk) leaves files at most one epoch ahead of last.pt;
the next writer (resume), and ``okd test``/``export``/``predict``, put them back in line with last.pt
(:meth:`RunStore.reconcile`, :func:`current_file`). SIGINT/SIGTERM that arrive during a save are held until it
is complete (:func:`deferred_signals`). The previous best.pt is kept as a hard link until last.pt commits its
replacement, so a stop in mid-save never loses the best epoch.

One process writes a folder: the writer holds an exclusive ``flock`` on ``.okd.lock`` in it, which the operating
system releases when the process ends, however it ends (so ``kill -9`` leaves no stale lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from okd.engine.checkpoint import atomic_save, atomic_write_text, load_checkpoint
from okd.engine.deploy_file import DEPLOY_FORMAT
from okd.engine.run_log import log, metrics_csv_text
from okd.errors import CheckpointError, RunFolderError, UnsafeCheckpointError

CHECKPOINT_FORMAT = "okd-run-v1"
BEST_NOTE = (
    "best.pt holds the epoch with the highest test top-1 of the deployable head: it is selected on the "
    "test split (as the reference papers report), so its accuracy is optimistic; last.pt is the honest number"
)
LOCK_NAME = ".okd.lock"
BEST_BACKUP = ".best.pt.prev"  # the committed best.pt while its replacement is not yet committed
FAULT_ENV = "OKD_FAULT_AT"


# ------------------------------------------------------------------------------------------------ records
def last_record(cfg, runner, plan, epoch: int, history: list[dict], best: dict, rngs: list) -> dict:
    """last.pt: everything a resume needs, and (``epoch``, ``best``) what the other files hold."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "epoch": epoch,
        "num_classes": int(runner.method.ctx.num_classes),
        "method": runner.method.state_dict(),
        **plan.state_dict(),
        "runner": runner.state_dict(),
        "rng_per_rank": rngs,
        "world_size": len(rngs),
        "history": history,
        "best": best,
    }


def best_record(last: dict) -> dict:
    """best.pt: the last.pt record of the best epoch, marked as selected on the test split."""
    return {"format": CHECKPOINT_FORMAT + "-best", "note": BEST_NOTE, "selected_on": "test", **last}


def deploy_record(cfg, method, epoch: int, rebuild: dict | None = None) -> dict:
    """deploy.pt: the method's deployable network alone, with what rebuilds and feeds it (``rebuild``, else
    :func:`okd.models.spec.deploy_fields` from the config: the model spec, a folder dataset's preprocessing)."""
    from okd.models.spec import deploy_fields

    deploy = method.deployable()
    return {
        "format": DEPLOY_FORMAT,
        "model": cfg.run.model.name,
        "method": cfg.method_name,
        "num_classes": int(method.ctx.num_classes),
        "epoch": epoch,
        **(rebuild if rebuild is not None else deploy_fields(cfg)),
        "state_dict": {k: v.detach().cpu() for k, v in deploy.state_dict().items()},
    }


def first_nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor of ``state`` holding a NaN or inf (one host sync), else None."""
    names = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not names:
        return None
    flags = torch.stack([torch.isfinite(state[k]).all() for k in names]).cpu()
    bad = (~flags).nonzero()
    return names[int(bad[0])] if len(bad) else None


def nonfinite_values(row: dict[str, float]) -> list[str]:
    return [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]


# ------------------------------------------------------------------------------------------------ signals
@contextlib.contextmanager
def deferred_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then deliver them: a save is never cut in half.

    Outside the main thread (where Python cannot install handlers) the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in dict.fromkeys(received):
            signal.raise_signal(s)


def fault_point(when: str, name: str, epoch: int) -> None:
    """Test hook: ``OKD_FAULT_AT=<before|after>:<file>:<epoch>:<SIGNAL>`` (e.g. ``before:last.pt:2:SIGKILL``)
    sends SIGNAL to this process just before/after the rename of ``file`` in the save of ``epoch``.

    tests/test_faults.py stops runs this way at every boundary of the epoch-end save; unset, it does nothing."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec.rsplit(":", 1)[0] == f"{when}:{name}:{epoch}":
        os.kill(os.getpid(), getattr(signal, spec.rsplit(":", 1)[1]))


# ------------------------------------------------------------------------------------------------ the store
class RunStore:
    """The writer of one run folder (``writer=False``: a DDP rank other than 0, which writes nothing)."""

    def __init__(self, run_dir: str | Path, writer: bool = True) -> None:
        self.dir = Path(run_dir)
        self.writer = writer
        self.committed_epoch = 0  #: the epoch last.pt holds (what a stop leaves)
        self._lock_fd: int | None = None
        self._created = False  # this store made the folder
        self._created_lock = False  # ... or the lock file
        self._wrote = False

    # -- the lock
    def lock(self, create: bool = True) -> RunStore:
        """Take the folder's exclusive lock (``create``: making the folder for a new run) and remove the
        temporaries a stopped writer left; a folder held by another process or not writable is refused."""
        if not self.writer:
            return self
        where = str(self.dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise RunFolderError(f"{where!r} is a file, not a run folder; choose another output_dir or name")
        if not create and not self.dir.is_dir():
            raise CheckpointError(f"run folder {where!r} does not exist; nothing to resume")
        try:
            if not self.dir.exists():
                self.dir.mkdir(parents=True)
                self._created = True
            self._created_lock = not (self.dir / LOCK_NAME).exists()
            fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            if not os.access(self.dir, os.W_OK | os.X_OK):
                os.close(fd)
                raise PermissionError(13, "Permission denied")
        except OSError as exc:
            raise RunFolderError(
                f"cannot write the run folder {where!r} ({exc.strerror or exc}); "
                "choose a writable output_dir (output_dir=...) or another name"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(
                f"run folder {where!r} is being written by another okd process (it holds {LOCK_NAME} there); "
                "wait until that run ends, or train into another folder (name=...)"
            ) from None
        self._lock_fd = fd
        for tmp in self.dir.glob(".*.tmp"):  # fully or partly written files of a writer stopped before the rename
            tmp.unlink(missing_ok=True)
        return self

    def release(self) -> None:
        """Release the lock; a folder this store created and never wrote to is removed again."""
        if self._lock_fd is None:
            return
        if not self._wrote and (self._created or self._created_lock):
            (self.dir / LOCK_NAME).unlink(missing_ok=True)
            if self._created:
                with contextlib.suppress(OSError):
                    self.dir.rmdir()
        os.close(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    # -- writes
    def _save(self, obj: dict, name: str, epoch: int) -> None:
        self._wrote = True
        atomic_save(obj, self.dir / name, lambda when: fault_point(when, name, epoch))

    def _write_text(self, text: str, name: str, epoch: int) -> None:
        self._wrote = True
        atomic_write_text(text, self.dir / name, lambda when: fault_point(when, name, epoch))

    def begin(self, cfg, last: dict | None, deploy: Callable[[], dict]) -> None:
        """Open the run for training: a resumed folder is put in line with its last.pt (``last``), a new one
        loses what an attempt that never committed an epoch left; then config.yaml is written."""
        self.committed_epoch = last["epoch"] if last is not None else 0
        if not self.writer:
            return
        try:
            with deferred_signals():
                if last is not None:
                    self.reconcile(last, deploy)
                else:
                    for name in ("metrics.csv", "best.pt", "deploy.pt", BEST_BACKUP):
                        (self.dir / name).unlink(missing_ok=True)
                self._write_text(cfg.to_yaml(), "config.yaml", self.committed_epoch)
        except OSError as exc:
            raise RunFolderError(f"cannot write the run folder {str(self.dir)!r} ({exc.strerror or exc})") from None

    def commit(self, last: dict, improved: bool, deploy: dict) -> None:
        """Save epoch ``last["epoch"]``: metrics.csv, best.pt (if ``improved``), deploy.pt, then last.pt."""
        epoch = last["epoch"]
        if self.writer:
            with deferred_signals():
                try:
                    self._write_text(metrics_csv_text(last["history"]), "metrics.csv", epoch)
                    if improved:
                        self._keep_best()
                        self._save(best_record(last), "best.pt", epoch)
                    self._save(deploy, "deploy.pt", epoch)
                    self._save(last, "last.pt", epoch)
                    self.committed_epoch = epoch
                except OSError as exc:
                    self._restore_best()
                    raise RunFolderError(
                        f"saving epoch {epoch} into {str(self.dir)!r} failed ({exc.strerror or exc}); nothing of it "
                        f"was committed. {self.intact()} Once the problem is fixed (e.g. disk space freed), "
                        + (
                            f"resume with `okd train --resume {self.dir}`."
                            if self.committed_epoch
                            else "start it again."
                        )
                    ) from None
                (self.dir / BEST_BACKUP).unlink(missing_ok=True)
        else:
            self.committed_epoch = epoch

    def intact(self) -> str:
        """What the folder holds now, in words (for stop and failure messages)."""
        if self.committed_epoch == 0:
            return "No epoch was committed yet (no last.pt)."
        return f"The folder holds epoch {self.committed_epoch}, committed in last.pt, intact."

    # -- best.pt kept until its replacement is committed
    def _keep_best(self) -> None:
        best, backup = self.dir / "best.pt", self.dir / BEST_BACKUP
        backup.unlink(missing_ok=True)
        if best.exists():
            with contextlib.suppress(OSError):  # a filesystem without hard links: no copy kept
                os.link(best, backup)

    def _restore_best(self) -> None:
        backup = self.dir / BEST_BACKUP
        if backup.exists():
            os.replace(backup, self.dir / "best.pt")

    # -- repair
    def reconcile(self, last: dict, deploy: Callable[[], dict]) -> list[str]:
        """Put metrics.csv, deploy.pt and best.pt in line with last.pt ``last`` after a stop in mid-save.

        ``deploy()`` gives the deploy.pt record of last.pt's state. Returns what was repaired; a best.pt whose
        epoch can no longer be rebuilt is left as it is and reported (``"best.pt lost"``)."""
        epoch = last["epoch"]
        fixed = []
        with deferred_signals():
            text = metrics_csv_text(last["history"])
            path = self.dir / "metrics.csv"
            if not path.is_file() or path.read_bytes() != text.encode("utf-8"):
                self._write_text(text, "metrics.csv", epoch)
                fixed.append("metrics.csv")
            if _epoch_of(self.dir / "deploy.pt") != epoch:
                self._save(deploy(), "deploy.pt", epoch)
                fixed.append("deploy.pt")
            best = self._reconcile_best(last)
            if best:
                fixed.append(best)
        if fixed:
            log.info(f"{self.dir}: put {', '.join(fixed)} back in line with last.pt (epoch {epoch})")
        if "best.pt lost" in fixed:
            log.warning(f"{self.dir}: {best_lost_message(self.dir, last)}")
        return fixed

    def _reconcile_best(self, last: dict) -> str | None:
        want = int(last["best"].get("epoch", 0))
        best, backup = self.dir / "best.pt", self.dir / BEST_BACKUP
        if want == 0 or _epoch_of(best) == want:
            backup.unlink(missing_ok=True)
            return None
        if _epoch_of(backup) == want:
            self._wrote = True
            os.replace(backup, best)
            return "best.pt"
        if want == last["epoch"]:
            self._save(best_record(last), "best.pt", last["epoch"])
            backup.unlink(missing_ok=True)
            return "best.pt"
        return "best.pt lost"


def best_lost_message(run_dir: Path, last: dict) -> str:
    held = _epoch_of(run_dir / "best.pt")
    return (
        f"best.pt holds epoch {held if held is not None else 'none'}, but last.pt says the best epoch is "
        f"{last['best']['epoch']}, whose weights are no longer on disk (best.pt was not saved with it); "
        "use last.pt (--checkpoint last), or train on to a new best epoch"
    )


def _epoch_of(path: Path) -> int | None:
    if not path.is_file():
        return None
    try:
        epoch = load_checkpoint(path).get("epoch")
    except UnsafeCheckpointError:
        raise  # a file holding code is refused, not repaired over
    except CheckpointError:
        return None  # missing or truncated: rebuilt from last.pt where it can be
    return int(epoch) if epoch is not None else None


# ------------------------------------------------------------------------------------------------ readers
def run_folder_of(path: str | Path) -> Path:
    """A run folder given as itself or as one of its checkpoint files (``RUN/last.pt`` -> ``RUN``)."""
    path = Path(path)
    return path.parent if path.is_file() and path.suffix == ".pt" else path


def current_file(run_dir: str | Path, which: str) -> Path:
    """The file of ``run_dir`` that holds ``which`` (``last``, ``best`` or ``deploy``) as last.pt commits it.

    A best.pt or deploy.pt that a stop in mid-save left out of line with last.pt is rebuilt on disk when no
    writer holds the folder; where the folder cannot be written, last.pt is returned where it holds the same
    state (a caller rebuilds the deployable network from it). A best.pt that cannot be rebuilt is refused."""
    run_dir = Path(run_dir)
    path, last_path = run_dir / f"{which}.pt", run_dir / "last.pt"
    if which == "last" or not last_path.is_file():
        return path
    try:
        last = load_checkpoint(last_path)
    except CheckpointError:
        return path  # an unreadable last.pt commits nothing: read the file as it is
    if last.get("format") != CHECKPOINT_FORMAT or "best" not in last:
        return path
    epoch, best_epoch = last["epoch"], int(last["best"].get("epoch", 0))
    want = epoch if which == "deploy" else best_epoch
    if want == 0 or _epoch_of(path) == want:
        return path
    store = RunStore(run_dir)
    try:
        store.lock(create=False)
    except RunFolderError as exc:
        if "another okd process" in str(exc):
            return path  # the writer puts the folder in line itself
        if which == "deploy" or best_epoch == epoch:
            return last_path  # read-only: last.pt holds the same state
        raise CheckpointError(f"{run_dir}: {best_lost_message(run_dir, last)}") from None
    with store:
        fixed = store.reconcile(last, lambda: _deploy_from_last(run_dir, epoch))
    if which == "best" and "best.pt lost" in fixed:
        raise CheckpointError(f"{run_dir}: {best_lost_message(run_dir, last)}")
    return path


def _deploy_from_last(run_dir: Path, epoch: int) -> dict:
    from okd.report.runs import load_run_method

    method, cfg, _ = load_run_method(run_dir, "last")
    return deploy_record(cfg, method, epoch)
