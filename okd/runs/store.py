"""The writer of a run folder: one process per folder, and an epoch-end save that is one commit.

At the end of an epoch the writer saves, in this order, metrics.csv, best.pt (when the epoch improved),
deploy.pt and, last, last.pt; each file goes to a temporary file, is fsync'd and renamed over the old one, so
every file is either its old or its new version. ``last.pt`` is the commit point (:mod:`okd.runs.records`):
its ``epoch`` is the epoch the folder holds. A process stopped anywhere in the save (kill -9, SIGTERM, a full
disk) leaves files at most one epoch ahead of last.pt; the next writer (resume) puts them back in line
(:meth:`RunStore.reconcile`), and readers (:class:`okd.runs.reader.Run`) never trust them meanwhile.
SIGINT/SIGTERM that arrive during a save are held until it is complete (:func:`deferred_signals`). The
previous best.pt is kept as a hard link until last.pt commits its replacement.

One process writes a folder: the writer holds an exclusive ``flock`` on ``.okd.lock``, which the operating
system releases when the process ends, however it ends (``kill -9`` leaves no stale lock). A lock file deleted
under a running writer (a cleanup script) cannot let a second writer in unnoticed: before every rename of a save
the writer checks that the file it locked is still the file on disk, and stops otherwise.

A new run's writer marks the folder ``.okd.uncommitted`` until its first last.pt: files left beside that mark
are an attempt that never committed and are cleared by the next start; run files *without* it and without
last.pt (a run whose last.pt was lost) are never deleted: the start is refused with what the folder holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from okd.errors import ConfigError, RunFolderError
from okd.io import atomic_save, atomic_write_text
from okd.log import log
from okd.runs.metrics import metrics_csv_text
from okd.runs.records import best_lost_message, best_record, epoch_of
from okd.runs.tracker_ids import TRACKERS_FILE, read_tracker_ids, tracker_ids_text

LOCK_NAME = ".okd.lock"
BEST_BACKUP = ".best.pt.prev"  # the committed best.pt while its replacement is not yet committed
UNCOMMITTED = ".okd.uncommitted"  # a new run's mark until its first commit
RESULT_FILES = ("metrics.csv", "best.pt", "deploy.pt", BEST_BACKUP)
FAULT_ENV = "OKD_FAULT_AT"


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

    tests/runs/test_faults.py stops runs this way at every boundary of the epoch-end save; unset, it does nothing."""
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
            raise RunFolderError(f"run folder {where!r} does not exist; nothing to resume")
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
        if not self._holds_lock_file():  # replaced between our open and our flock: lock the file on disk
            os.close(fd)
            self._lock_fd = None
            return self.lock(create)
        for tmp in self.dir.glob(".*.tmp"):  # fully or partly written files of a writer stopped before the rename
            tmp.unlink(missing_ok=True)
        return self

    def _holds_lock_file(self) -> bool:
        """The file this store locked is still the folder's ``.okd.lock`` (not deleted, not replaced)."""
        try:
            on_disk, held = os.stat(self.dir / LOCK_NAME), os.fstat(self._lock_fd)
        except OSError:
            return False
        return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)

    def _check_lock(self, epoch: int) -> None:
        if self._lock_fd is not None and not self._holds_lock_file():
            raise RunFolderError(
                f"{self.dir / LOCK_NAME} was deleted or replaced while this run was writing the folder, so another "
                f"okd process may be writing it now; this run stops without saving epoch {epoch}. {self.intact()} "
                "Do not delete .okd.lock while a run writes the folder; once no other okd process writes it, "
                f"resume with `okd train --resume {self.dir}`."
            )

    def refuse_orphaned_results(self) -> None:
        """Refuse to start a new run in a folder whose results were committed once but whose last.pt is gone.

        Files beside the ``.okd.uncommitted`` mark are an attempt that never committed (they are cleared by
        :meth:`begin`); result files without it belong to a run that did commit: they are never deleted."""
        if (self.dir / "last.pt").exists() or (self.dir / UNCOMMITTED).exists():
            return
        found = [name for name in RESULT_FILES if (self.dir / name).exists()]
        if found:
            raise ConfigError(
                f"run folder {str(self.dir)!r} holds results of an earlier run ({', '.join(found)}) but no last.pt, "
                "so it cannot be resumed, and okd does not delete results to start over. Keep them and train "
                "into another folder (name=...), or remove the folder yourself (rm -r "
                f"{self.dir}) to start anew there."
            )

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
    def _boundary(self, name: str, epoch: int) -> Callable[[str], None]:
        """What runs at each rename of a save: the test hook, then (before the rename) the lock check."""

        def at(when: str) -> None:
            fault_point(when, name, epoch)
            if when == "before":
                self._check_lock(epoch)

        return at

    def _save(self, obj: dict, name: str, epoch: int) -> None:
        self._wrote = True
        atomic_save(obj, self.dir / name, self._boundary(name, epoch))

    def _write_text(self, text: str, name: str, epoch: int) -> None:
        self._wrote = True
        atomic_write_text(text, self.dir / name, self._boundary(name, epoch))

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
                    (self.dir / UNCOMMITTED).unlink(missing_ok=True)  # a stop right after the first commit
                else:
                    self.refuse_orphaned_results()
                    self._write_text("a new run: no epoch committed yet\n", UNCOMMITTED, 0)
                    for name in (*RESULT_FILES, TRACKERS_FILE):
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
                (self.dir / UNCOMMITTED).unlink(missing_ok=True)
        else:
            self.committed_epoch = epoch

    def record_tracker_ids(self, ids: dict[str, dict[str, str]]) -> None:
        """Merge ``ids`` (``{tracker: {"run_id": ...}}``) into ``trackers.json`` (atomically; outside the commit).
        A failure to write it is logged and leaves the run as it is: a tracker id is never part of the record."""
        if not self.writer or not ids:
            return
        merged = {**read_tracker_ids(self.dir), **ids}
        try:
            self._wrote = True
            atomic_write_text(tracker_ids_text(merged), self.dir / TRACKERS_FILE)
        except OSError as exc:
            log.warning(
                f"{self.dir}: could not write {TRACKERS_FILE} ({exc.strerror or exc}); a resume of this "
                "run will start new tracker runs"
            )

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
            if epoch_of(self.dir / "deploy.pt") != epoch:
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
        if want == 0 or epoch_of(best) == want:
            backup.unlink(missing_ok=True)
            return None
        if epoch_of(backup) == want:
            self._wrote = True
            os.replace(backup, best)
            return "best.pt"
        if want == last["epoch"]:
            self._save(best_record(last), "best.pt", last["epoch"])
            backup.unlink(missing_ok=True)
            return "best.pt"
        return "best.pt lost"
