"""Experiment-tracker sinks beside TensorBoard: MLflow (the ``mlflow`` extra) and Weights & Biases (``wandb``).

Each takes the trackers' interface (:class:`okd.engine.trackers.Tracker`) and, given the id a run folder's
``trackers.json`` holds, continues that tracker run (a resumed okd run continues its MLflow run and W&B run).
"""

from __future__ import annotations

import os
import time
from typing import Any

from okd.engine.tensorboard import finite_scalars
from okd.extras import require

MLFLOW_BATCH = 100  # MLflow takes at most 100 params (1000 metrics) per log_batch call
FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"
PARAM_CHARS = 500  # MLflow's shortest limit on a param value among its stores
MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}  # okd's ending -> MLflow's


def is_file_store(uri: str | None) -> bool:
    """A tracking URI that names a folder: ``file:...`` or a plain path (not a server, a database or Databricks)."""
    if uri is None:
        return False
    return uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks"))


class MLflowTracker:
    """One MLflow run (through ``MlflowClient``: no global active run), in experiment ``experiment`` of the
    tracking store ``uri`` (:func:`okd.engine.trackers.mlflow_uri`)."""

    name = "mlflow"

    def __init__(self, uri: str | None, experiment: str, run_name: str, run_id: str | None = None) -> None:
        require("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        if is_file_store(uri or os.environ.get("MLFLOW_TRACKING_URI")):  # MLflow 3 refuses file stores (in
            os.environ.setdefault(FILE_STORE_ENV, "true")  # maintenance mode) unless told; okd was told to use one

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self.run_id = self.client.get_run(run_id).info.run_id  # raises when the store no longer has it
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self.uri = uri

    def log_params(self, params: dict[str, Any]) -> None:
        """Params not logged yet (MLflow refuses a param's second value: a key changed on resume keeps its first
        one here; ``resume_history.jsonl`` in the run folder records the change)."""
        from mlflow.entities import Param

        known = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:PARAM_CHARS]) for k, v in sorted(params.items()) if k not in known]
        for i in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MLFLOW_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int, axis: str = "epoch") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, int(step)) for k, v in finite_scalars(metrics).items()]
        for i in range(0, len(items), 10 * MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + 10 * MLFLOW_BATCH])

    def close(self, status: str = "finished") -> None:
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS[status])


class WandbTracker:
    """One W&B run in project ``project`` (``WANDB_MODE=offline`` keeps it on disk, under ``WANDB_DIR``); epoch
    metrics are plotted against ``epoch``, per-step ones (``step/...``) against ``global_step``."""

    name = "wandb"

    def __init__(self, project: str, run_name: str, run_id: str | None = None) -> None:
        wandb = require("wandb", "wandb")
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow" if run_id is not None else None)
        self.run_id = self.run.id
        self._defined: set[str] = set()

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int, axis: str = "epoch") -> None:
        values = finite_scalars(metrics)
        for key in values.keys() - self._defined:
            self.run.define_metric(key, step_metric=axis)
            self._defined.add(key)
        self.run.log({**values, axis: int(step)})

    def close(self, status: str = "finished") -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)
