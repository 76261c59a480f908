"""The one logging interface the trainer calls: experiment trackers (TensorBoard, MLflow, W&B), never the record.

A :class:`Tracker` takes ``log_params(params)``, ``log_metrics(metrics, step, axis)`` (``axis``: ``epoch`` for
an epoch's metrics row, ``global_step`` for per-step scalars, ``train.track_every_steps``) and ``close(status)``
(``finished``, ``stopped``: Ctrl-C or SIGTERM, ``failed``: an error ended the run); its
``run_id`` (None where there is none) is kept in the run folder's ``trackers.json`` (:mod:`okd.runs.tracker_ids`)
so a resumed run continues the same tracker run.

The run folder stays the record. :class:`Trackers` calls each tracker guarded: a tracker that fails (cannot
open, a full disk, a lost server) is reported once with the error and left out for the rest of the run, which
goes on; nothing of the run folder depends on a tracker. A tracker asked for whose package is missing is
refused before training (:func:`check_trackers`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from okd.engine.tensorboard import TensorBoardLogger
from okd.engine.tracker_sinks import MLflowTracker, WandbTracker
from okd.extras import require
from okd.log import log
from okd.runs.resume_policy import flatten
from okd.runs.store import RunStore
from okd.runs.tracker_ids import read_tracker_ids

EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # train.<key> -> its extra


class Tracker(Protocol):
    name: str
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int, axis: str = "epoch") -> None: ...

    def close(self, status: str = "finished") -> None: ...


def wanted(train_cfg) -> list[str]:
    """The trackers ``train`` asks for: ``train.tensorboard``, ``train.mlflow``, ``train.wandb``."""
    return [name for name in EXTRAS if getattr(train_cfg, name)]


def check_trackers(train_cfg) -> None:
    """Refuse, before anything is built, a tracker whose package is not installed (with the pip command)."""
    for name in wanted(train_cfg):
        require("tensorboard" if name == "tensorboard" else name, EXTRAS[name])


class Trackers:
    """The trackers of one run, each called guarded (see the module docstring)."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # any failure of a tracker: the run goes on without it
                self.trackers.remove(tracker)
                log.warning(
                    f"tracker {tracker.name} failed in {what} ({type(exc).__name__}: {str(exc).strip()[:300]}); "
                    "it is left out for the rest of this run, which goes on: the run folder is the record"
                )

    def log_params(self, params: dict[str, Any]) -> None:
        self._each("log_params", lambda t: t.log_params(params))

    def log_epoch(self, row: dict, epoch: int) -> None:
        """An epoch's metrics row (the keys of metrics.csv), at step ``epoch``."""
        self._each("log_metrics", lambda t: t.log_metrics(row, epoch, "epoch"))

    def log_step(self, metrics: dict[str, float], global_step: int) -> None:
        self._each("log_metrics", lambda t: t.log_metrics(metrics, global_step, "global_step"))

    def close(self, status: str = "finished") -> None:
        self._each("close", lambda t: t.close(status))
        self.trackers = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close("finished")
        else:
            self.close("stopped" if issubclass(exc_type, KeyboardInterrupt) else "failed")


def mlflow_uri(cfg) -> str:
    """``train.mlflow_uri``, else ``MLFLOW_TRACKING_URI``, else a file store beside the runs,
    ``<output_dir>/mlruns`` (MLflow's own default needs a database the mlflow extra does not install)."""
    given = cfg.run.train.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return given or (Path(cfg.run.output_dir).resolve() / "mlruns").as_uri()


def _open(name: str, cfg, run_dir: Path, run_id: str | None) -> Tracker:
    t = cfg.run.train
    if name == "tensorboard":
        return TensorBoardLogger(run_dir)
    if name == "mlflow":
        return MLflowTracker(mlflow_uri(cfg), t.tracker_project, run_dir.name, run_id)
    return WandbTracker(t.tracker_project, run_dir.name, run_id)


def open_trackers(cfg, store: RunStore) -> Trackers:
    """The trackers ``cfg`` asks for, each continuing the tracker run ``trackers.json`` names (a resumed run)
    or starting one, whose id is then recorded there; one that cannot open is reported and left out."""
    known = read_tracker_ids(store.dir)
    opened: list[Tracker] = []
    for name in wanted(cfg.run.train):
        run_id = known.get(name, {}).get("run_id")
        try:
            try:
                opened.append(_open(name, cfg, store.dir, run_id))
            except Exception as exc:
                if run_id is None:
                    raise
                log.warning(f"tracker {name} cannot continue run {run_id} ({type(exc).__name__}); starting a new one")
                opened.append(_open(name, cfg, store.dir, None))
        except Exception as exc:  # a tracker that cannot open never stops the run
            log.warning(
                f"tracker {name} could not start ({type(exc).__name__}: {str(exc).strip()[:300]}); this run goes on "
                "without it: the run folder is the record"
            )
    store.record_tracker_ids({t.name: {"run_id": t.run_id} for t in opened if t.run_id is not None})
    trackers = Trackers(opened)
    trackers.log_params(flatten(cfg.to_dict()))
    return trackers
