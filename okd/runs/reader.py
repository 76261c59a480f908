"""The one reader of a run folder, :class:`Run`: every command that reads a run goes through it.

A reader answers from the epoch ``last.pt`` commits, or refuses with the reason:

- its config, committed epoch, history (last.pt's own, never a metrics.csv row ahead of it) and best epoch;
- a checkpoint by name (``last``, ``best``) and the deploy record: a best.pt or deploy.pt that a stop in
  mid-save left out of line with last.pt is never read; the record is rebuilt *in memory* from last.pt (or the
  kept previous best.pt) where it can be, else refused naming what is lost;
- a file of the folder that another run wrote (a last.pt copied in, a best.pt or deploy.pt of another method,
  data set or seed) is refused as resume refuses it.

A reader never writes and takes no lock, so any number of readers and one writer are safe together: the writer
renames complete files into place and last.pt last, and a reader that finds the file it needs replaced by a
newer commit while it reads starts over from the new last.pt.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import OmegaConf

from okd.config import Config, parse_overrides
from okd.data.cifar import SPECS
from okd.errors import CheckpointError, OKDError, UnsafeCheckpointError
from okd.io import first_line, load_checkpoint, load_state_checked, require_keys
from okd.methods import Method
from okd.methods.build import build_config, build_method, method_class
from okd.models.deploy_file import read_deploy
from okd.models.spec import check_stored_config
from okd.runs import resume_policy
from okd.runs.records import (
    CHECKPOINT_FORMAT,
    RUN_KEYS,
    best_lost_message,
    best_record,
    deploy_record,
    epoch_of,
)
from okd.runs.store import BEST_BACKUP

CHECKPOINTS = ("last", "best")


def run_folder_of(path: str | Path) -> Path:
    """A run folder given as itself or as one of its checkpoint files (``RUN/last.pt`` -> ``RUN``)."""
    path = Path(path)
    return path.parent if path.is_file() and path.suffix == ".pt" else path


def is_run_dir(path: str | Path) -> bool:
    """``path`` is a run folder with a committed epoch (its last.pt)."""
    return (Path(path) / "last.pt").is_file()


def expand_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run folders among ``paths``; a folder that is not a run but holds runs expands to them (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if is_run_dir(p):
            out.append(p)
        elif p.is_dir() and (subs := sorted(s for s in p.iterdir() if is_run_dir(s))):
            out.extend(subs)
        elif p.is_dir() and (p / "config.yaml").is_file():
            raise CheckpointError(f"{str(p)!r} holds no committed epoch yet (no last.pt); report it once one is")
        else:
            raise CheckpointError(f"{str(p)!r} is not a run folder (no last.pt) nor a folder of runs")
    return out


def read_run_config(run_dir: str | Path) -> dict:
    """The resolved config a run saved in ``config.yaml`` (a plain dict); for folders without a last.pt (a
    standalone deploy.pt beside its config). A run with a last.pt is read through :class:`Run`."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{str(run_dir)!r} has no config.yaml; is it an okd run folder?")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is not valid YAML ({first_line(exc)})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} does not hold a mapping")
    return cfg


class Run:
    """One run folder, read as its last.pt commits it (see the module docstring). Never writes."""

    def __init__(self, path: str | Path, mmap: bool = True) -> None:
        """``mmap``: map last.pt's tensors rather than read them (readers; a resume, which trains on them for
        hours, reads them into memory)."""
        self.dir = run_folder_of(path)
        self._mmap = mmap
        where = str(self.dir)
        if not self.dir.exists():
            raise CheckpointError(f"run folder {where!r} does not exist")
        if not self.dir.is_dir():
            raise CheckpointError(f"{where!r} is not a run folder; give runs/<name>")
        last = self.dir / "last.pt"
        if not last.exists() and not last.is_symlink():
            raise CheckpointError(self._no_commit_message())
        self._last: dict | None = None

    def _no_commit_message(self) -> str:
        held = [n for n in ("config.yaml", "metrics.csv", "best.pt", "deploy.pt") if (self.dir / n).exists()]
        holds = f" (it holds {', '.join(held)}, none of them committed)" if held else ""
        return (
            f"run folder {str(self.dir)!r} holds no committed epoch: no last.pt{holds}. Its run is still in its "
            "first epoch, or was stopped before the first commit; wait for the first epoch to end, or train it "
            "again with the same `okd train CONFIG ...` command"
        )

    # ------------------------------------------------------------------------------------------ the commit
    @property
    def last(self) -> dict:
        """last.pt, checked: an okd run checkpoint with every key, written for this folder."""
        if self._last is None:
            self._last = self._read_last()
        return self._last

    def _read_last(self) -> dict:
        path = self.dir / "last.pt"
        if not path.exists():
            raise CheckpointError(self._no_commit_message())
        ckpt = load_checkpoint(
            path, what="last.pt", hint="The run's commit is unreadable; resume cannot use it.", mmap=self._mmap
        )
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not an okd run checkpoint (format {ckpt.get('format')!r})")
        require_keys(ckpt, RUN_KEYS, path)
        resume_policy.check_belongs_to_folder(self.dir, ckpt)
        return ckpt

    def refresh(self) -> bool:
        """Re-read last.pt; True when a writer committed a newer epoch since it was read."""
        before = self.epoch if self._last is not None else None
        self._last = None
        return self.epoch != before

    @property
    def epoch(self) -> int:
        """The epoch the folder holds (last.pt's)."""
        return int(self.last["epoch"])

    @property
    def config_dict(self) -> dict:
        """The resolved config the run trained with (as last.pt records it)."""
        check_stored_config(self.last["config"])  # a network by import path is imported only with consent
        return self.last["config"]

    def config(self, overrides: list[str] = ()) -> Config:
        """The run's :class:`~okd.config.Config`, with ``key=value`` overrides."""
        raw = OmegaConf.merge(OmegaConf.create(self.config_dict), parse_overrides(list(overrides)))
        return build_config(raw)

    @property
    def history(self) -> list[dict[str, float]]:
        """One row per committed epoch (metrics.csv's columns), up to last.pt's epoch and no further."""
        return list(self.last["history"])

    @property
    def epochs(self) -> int:
        """The epochs the run was configured to train."""
        return int(self.config_dict["train"]["epochs"])

    @property
    def num_classes(self) -> int:
        stored = self.last.get("num_classes")
        if isinstance(stored, int):
            return stored
        dataset = self.config_dict["data"]["dataset"]
        if dataset in SPECS:
            return SPECS[dataset].num_classes
        raise CheckpointError(f"{self.dir / 'last.pt'} does not say how many classes the run has")

    @property
    def deploy_head(self) -> str | None:
        """The head that scores the deployed network: last.pt's best head, else the method class's, else the
        first head of the history (the trainer's rule)."""
        head = (self.last.get("best") or {}).get("head")
        if head:
            return head
        cls = method_class(self.config_dict["method"]["name"])
        if cls is not None and getattr(cls, "deploy_head", None):
            return cls.deploy_head
        scored = [row for row in self.history if any(k.startswith("test/") for k in row)]  # train.eval_every
        heads = [k.split("/")[1] for k in (scored[-1] if scored else {}) if k.endswith("/top1")]
        return heads[0] if heads else None

    @property
    def best_epoch(self) -> int:
        return int((self.last.get("best") or {}).get("epoch", 0))

    # -------------------------------------------------------------------------------------- checkpoints
    def checkpoint(self, which: str = "last") -> tuple[dict, str]:
        """The run record ``which`` (``last`` or ``best``) as last.pt commits it, and where it came from (a file,
        or ``"last.pt (best epoch rebuilt in memory)"``)."""
        if which not in CHECKPOINTS:
            raise OKDError(f"unknown checkpoint {which!r}; choose one of: {', '.join(CHECKPOINTS)}")
        if which == "last":
            return self.last, str(self.dir / "last.pt")
        for _ in range(3):
            found = self._best()
            if found is not None:
                return found
            if not self.refresh():  # nothing moved: the best epoch's weights are gone
                break
        raise CheckpointError(f"{self.dir}: {best_lost_message(self.dir, self.last)}")

    def _best(self) -> tuple[dict, str] | None:
        want = self.best_epoch
        if want == 0:
            raise CheckpointError(f"{self.dir} has no best epoch yet (no epoch was scored)")
        for name in ("best.pt", BEST_BACKUP):
            path = self.dir / name
            if epoch_of(path) == want:
                record = load_checkpoint(path, what=name)
                if self._same_run(record):
                    return record, str(path)
        if want == self.epoch:
            return best_record(self.last), f"{self.dir / 'last.pt'} (its epoch is the best epoch)"
        return None

    def _same_run(self, record: dict) -> bool:
        """A record of this run: the same method, model, data set and seed as last.pt."""
        theirs = record.get("config") if isinstance(record.get("config"), dict) else {}
        return resume_policy.identity(theirs) == resume_policy.identity(self.last["config"])

    def method(self, which: str = "last", overrides: list[str] = ()) -> Method:
        """The run's method rebuilt from checkpoint ``which``, in eval mode on the CPU."""
        record, source = self.checkpoint(which)
        return method_from_record(record, source, overrides, self.num_classes)

    def deploy_record(self) -> tuple[dict, str]:
        """The deploy.pt record of the committed epoch and its source: deploy.pt when it holds that epoch of
        this run, else rebuilt in memory from last.pt."""
        path = self.dir / "deploy.pt"
        for _ in range(3):
            if epoch_of(path) == self.epoch:
                record = read_deploy(path)
                if (
                    record.get("method") in (None, self.config_dict["method"]["name"])
                    and record.get("num_classes") == self.num_classes
                ):
                    return record, str(path)
            if not self.refresh():
                break
        cfg = self.config()
        return deploy_record(cfg, self.method("last"), self.epoch), f"{self.dir / 'last.pt'} (deploy record rebuilt)"


def method_from_record(record: dict, source: str, overrides: list[str] = (), num_classes: int | None = None) -> Method:
    """A method rebuilt from a run record (last.pt or best.pt contents), in eval mode on the CPU."""
    if "config" not in record or "method" not in record:
        raise CheckpointError(f"{source} is not a run checkpoint (no config/method state); use last.pt or best.pt")
    check_stored_config(record["config"])
    cfg = build_config(OmegaConf.merge(OmegaConf.create(record["config"]), parse_overrides(list(overrides))))
    stored = record.get("num_classes")
    classes = stored if isinstance(stored, int) else num_classes
    if classes is None:
        dataset = cfg.run.data.dataset
        if dataset not in SPECS:
            raise CheckpointError(f"{source} does not say how many classes the run has")
        classes = SPECS[dataset].num_classes
    method = build_method(cfg, classes)
    load_state_checked(method, record["method"], source)
    return method.eval()


def load_run_method(path: str | Path, which: str = "last", overrides: list[str] = ()):
    """Rebuild a run's method from a run folder (as last.pt commits it) or a checkpoint file, in eval mode on
    the CPU. Returns ``(method, cfg, source)``."""
    path = Path(path)
    if path.is_dir() or path.name in ("last.pt", "best.pt") and (path.parent / "last.pt").exists():
        run = Run(path if path.is_dir() else path.parent)  # RUN/best.pt names the best epoch, on disk or not
        which = which if path.is_dir() else path.stem
        record, source = run.checkpoint(which)
        method = method_from_record(record, source, overrides, run.num_classes)
    else:
        record = load_checkpoint(path)
        source = str(path)
        method = method_from_record(record, source, overrides)
    cfg = build_config(OmegaConf.merge(OmegaConf.create(record["config"]), parse_overrides(list(overrides))))
    return method, cfg, source


def deploy_head_of(run_dir: str | Path, cfg: dict | None = None, heads: list[str] = ()) -> str | None:
    """The head that scores the deployed network of ``run_dir`` (:attr:`Run.deploy_head`); for a folder
    without a readable last.pt: the method class's head, else the first of ``heads``."""
    try:
        return Run(run_dir).deploy_head
    except UnsafeCheckpointError:
        raise  # a pickled object: refused, never ignored
    except CheckpointError:
        pass
    name = ((cfg or {}).get("method") or {}).get("name")
    cls = method_class(name) if name else None
    if cls is not None and getattr(cls, "deploy_head", None):
        return cls.deploy_head
    return heads[0] if heads else None
