"""Experiment trackers through one interface: a failing tracker never breaks or changes a run, a missing package
is refused before training, and MLflow (a local file store) and W&B (offline) receive the run's metrics, a
resumed run continuing the same tracker run (its id kept in the run folder's trackers.json)."""

from __future__ import annotations

import contextlib
import json
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import helpers
import pytest

from okd.engine import trackers as trackers_mod
from okd.engine import trainer as trainer_mod
from okd.engine.trainer import config_from_run, train
from okd.errors import OKDError, StopRequested
from okd.methods.build import load_config
from okd.runs.metrics import read_metrics_csv
from okd.runs.store import RunStore
from okd.runs.tracker_ids import TRACKERS_FILE, read_tracker_ids

CONFIG = "cifar10/baseline_resnet20"


class StandInRun:
    """A W&B run as ``wandb.init`` returns it, recording what okd declares and logs."""

    def __init__(self, run_id: str) -> None:
        self.id, self.calls = run_id, []
        self.config = SimpleNamespace(update=lambda *a, **k: None)

    def define_metric(self, key, step_metric):
        self.calls.append(("define", key, step_metric))

    def log(self, row):
        self.calls.append(("log", row))


def tiny(root: Path, out: Path, name: str, epochs: int, **extra) -> list[str]:
    """40 training images in batches of 16 (3 steps per epoch), 16 test images."""
    settings = {"data.limit_train": 40, "data.batch_size": 16, "data.limit_test": 16, "data.test_batch_size": 16}
    return helpers.quick_overrides(root, out, name, epochs, {**settings, "seed": 3, **extra})


class Recording:
    name, run_id = "recording", None

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def log_params(self, params):
        self.calls.append(("params", len(params)))

    def log_metrics(self, metrics, step, axis="epoch"):
        self.calls.append((axis, step, sorted(metrics)))

    def close(self, status="finished"):
        self.calls.append(("close", status))


class Failing(Recording):
    name = "failing"

    def log_metrics(self, metrics, step, axis="epoch"):
        self.calls.append((axis, step))
        raise OSError(28, "No space left on device")


def test_a_failing_tracker_never_breaks_or_changes_the_run(cifar10_root, tmp_path, monkeypatch, capsys):
    reference = train(load_config(CONFIG, tiny(cifar10_root, tmp_path, "plain", 1)))
    failing, recording = Failing(), Recording()
    opened = {"failing": failing, "recording": recording}

    def fake_open(name, cfg, run_dir, run_id):
        if name == "broken":
            raise ConnectionError("tracking server unreachable")
        return opened[name]

    monkeypatch.setattr(trackers_mod, "wanted", lambda train_cfg: ["broken", "failing", "recording"])
    monkeypatch.setattr(trainer_mod, "check_trackers", lambda train_cfg: None)
    monkeypatch.setattr(trackers_mod, "_open", fake_open)
    run = train(load_config(CONFIG, tiny(cifar10_root, tmp_path, "tracked", 1, **{"train.track_every_steps": 1})))
    err = capsys.readouterr().err
    assert helpers.mentions(err, "tracker broken could not start (ConnectionError: tracking server unreachable)")
    assert helpers.mentions(err, "tracker failing failed in log_metrics (OSError")
    assert err.count("tracker failing failed") == 1
    assert failing.calls == [("params", failing.calls[0][1]), ("global_step", 1)]  # left out after its failure
    steps = [c[:2] for c in recording.calls if c[0] in ("epoch", "global_step")]
    assert steps == [("global_step", 1), ("global_step", 2), ("global_step", 3), ("epoch", 1)]
    assert recording.calls[-1] == ("close", "finished")
    assert "test/net/top1" in recording.calls[4][2] and recording.calls[1][2] == ["step/loss", "step/lr/net"]
    helpers.assert_same_runs(reference, run)  # the record is the run's own, trackers or not
    assert not (run / TRACKERS_FILE).exists()  # neither fake has a tracker run id


def test_a_missing_tracker_package_is_refused_before_training(cifar10_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    with pytest.raises(OKDError, match=r'pip install "okd\[mlflow\]"'):
        train(load_config(CONFIG, tiny(cifar10_root, tmp_path, "nomlflow", 1, **{"train.mlflow": "true"})))
    assert not (tmp_path / "nomlflow").exists()


def test_tensorboard_takes_per_step_scalars(cifar10_root, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = {"train.tensorboard": "true", "train.track_every_steps": 1}
    run = train(load_config(CONFIG, tiny(cifar10_root, tmp_path, "board", 1, **extra)))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("step/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("test/net/top1")] == [1]


def test_mlflow_file_store_receives_the_metrics_and_a_resume_continues_its_run(cifar10_root, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    extra = {"train.mlflow": "true", "train.mlflow_uri": uri, "train.track_every_steps": 1}
    started_ms = time.time() * 1000
    run = train(load_config(CONFIG, tiny(cifar10_root, tmp_path, "ml", 1, **extra)))
    run_id = read_tracker_ids(run)["mlflow"]["run_id"]
    train(config_from_run(run, ["train.epochs=2"]), run_dir=run, resume=True)
    assert read_tracker_ids(run)["mlflow"]["run_id"] == run_id  # the same MLflow run, continued
    client = MlflowClient(tracking_uri=uri)
    rows = read_metrics_csv(run / "metrics.csv")
    history = client.get_metric_history(run_id, "test/net/top1")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["test/net/top1"]) for r in rows]
    assert all(started_ms - 1000 <= m.timestamp <= time.time() * 1000 for m in history)  # milliseconds, as MLflow
    assert [m.step for m in client.get_metric_history(run_id, "step/loss")] == [1, 2, 3, 4, 5, 6]
    found = client.get_run(run_id)
    assert found.data.params["train.epochs"] == "1" and found.data.params["method.name"] == "baseline"
    assert found.info.status == "FINISHED" and found.info.run_name == "ml"


def wandb_history(folder: Path) -> list[dict]:
    """The history rows of W&B offline runs under ``folder``: each ``run-<id>.wandb`` file is a log of records in
    32 KiB blocks (a 7-byte header per fragment: crc, length, type; 1 full, 2 first, 3 middle, 4 last), each
    record a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, frag = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or (kind == 0 and length == 0):
                pos += left
                continue
            frag, pos = frag + data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(frag)
                frag = b""
                if record.WhichOneof("record_type") == "history":
                    items = record.history.item
                    rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items})
    return rows


def test_wandb_offline_receives_the_metrics_and_a_resume_continues_its_run(cifar10_root, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    run = train(load_config(CONFIG, tiny(cifar10_root, tmp_path, "wb", 1, **{"train.wandb": "true"})))
    run_id = read_tracker_ids(run)["wandb"]["run_id"]
    train(config_from_run(run, ["train.epochs=2"]), run_dir=run, resume=True)
    assert read_tracker_ids(run)["wandb"]["run_id"] == run_id
    assert {p.name.rsplit("-", 1)[1] for p in tmp_path.glob("wandb/offline-run-*")} == {run_id}
    epochs = [(r["epoch"], r["test/net/top1"]) for r in wandb_history(tmp_path) if "epoch" in r]
    assert epochs == [(r["epoch"], r["test/net/top1"]) for r in read_metrics_csv(run / "metrics.csv")]


def test_which_mlflow_stores_are_folders():
    """okd allows MLflow 3's file store (maintenance mode) for these only: the run asked for a folder."""
    from okd.engine.tracker_sinks import is_file_store

    folders = ["file:/data/mlruns", "file:///data/mlruns", "mlruns", "/data/mlruns"]
    others = [None, "http://mlflow:5000", "https://host/mlflow", "sqlite:///mlflow.db", "databricks", "databricks://p"]
    assert [is_file_store(u) for u in folders] == [True] * 4
    assert [is_file_store(u) for u in others] == [False] * 6


def test_the_mlflow_store_is_the_key_else_the_environment_else_beside_the_runs(tmp_path, monkeypatch):
    from okd.engine.trackers import mlflow_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(CONFIG, [f"output_dir={tmp_path / 'runs'}"])
    assert mlflow_uri(cfg) == (tmp_path / "runs" / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert mlflow_uri(cfg) == "http://mlflow:5000"
    cfg = load_config(CONFIG, ["train.mlflow_uri=file:/data/mlruns"])
    assert mlflow_uri(cfg) == "file:/data/mlruns"


def test_trackers_are_closed_with_how_the_run_ended():
    stops = ((KeyboardInterrupt, "stopped"), (StopRequested(15), "stopped"), (BaseException, "failed"))  # 15: SIGTERM
    for raised, status in ((None, "finished"), *stops, (OSError, "failed")):
        recording = Recording()
        with contextlib.suppress(BaseException), trackers_mod.Trackers([recording]):
            if raised is not None:
                raise raised
        assert recording.calls == [("close", status)]
    from okd.engine.tracker_sinks import MLFLOW_STATUS

    assert MLFLOW_STATUS == {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


def test_wandb_runs_are_named_after_the_folder_and_only_a_known_run_is_resumed(tmp_path, monkeypatch):
    """The arguments ``wandb.init`` gets, seen through a stand-in module: a fresh run has no id and no resume."""
    inits: list[dict] = []

    def init(**kwargs):
        inits.append(kwargs)
        return StandInRun(kwargs["id"] or "new-id")

    monkeypatch.setitem(sys.modules, "wandb", type(sys)("wandb"))
    monkeypatch.setattr(sys.modules["wandb"], "init", init, raising=False)
    cfg = load_config(CONFIG, ["train.tracker_project=proj"])
    fresh = trackers_mod._open("wandb", cfg, tmp_path / "my-run", None)
    resumed = trackers_mod._open("wandb", cfg, tmp_path / "my-run", "abc123")
    assert inits == [
        {"project": "proj", "name": "my-run", "id": None, "resume": None},
        {"project": "proj", "name": "my-run", "id": "abc123", "resume": "allow"},
    ]
    assert (fresh.run_id, resumed.run_id) == ("new-id", "abc123")
    fresh.log_metrics({"train/loss": 1.5, "lr": 0.1}, 1)
    fresh.log_metrics({"train/loss": 1.25, "lr": 0.1, "test/net/top1": float("nan")}, 2)
    fresh.log_metrics({"step/loss": 2.0}, 7, axis="global_step")
    defines = sorted(c[1:] for c in fresh.run.calls if c[0] == "define")  # once per key, against its axis
    assert defines == [("lr", "epoch"), ("step/loss", "global_step"), ("train/loss", "epoch")]
    assert [c[1] for c in fresh.run.calls if c[0] == "log"] == [  # non-finite values left out
        {"train/loss": 1.5, "lr": 0.1, "epoch": 1},
        {"train/loss": 1.25, "lr": 0.1, "epoch": 2},
        {"step/loss": 2.0, "global_step": 7},
    ]


def test_a_tracker_run_that_cannot_be_continued_is_replaced_by_a_new_one(tmp_path, monkeypatch, caplog):
    """trackers.json names a W&B run the service no longer has: a new tracker run starts (with a warning) and
    its id replaces the old one."""

    def init(**kwargs):
        if kwargs["id"] is not None:
            raise RuntimeError("run gone-run not found")
        return StandInRun("fresh")

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init))
    cfg = load_config(CONFIG, ["train.wandb=true"])
    with RunStore(tmp_path / "run").lock() as store:
        store.record_tracker_ids({"wandb": {"run_id": "gone-run"}})
        with caplog.at_level("WARNING", logger="okd"):
            trackers = trackers_mod.open_trackers(cfg, store)
    assert "tracker wandb cannot continue run gone-run (RuntimeError); starting a new one" in caplog.text
    assert [t.run_id for t in trackers.trackers] == ["fresh"]
    assert read_tracker_ids(tmp_path / "run") == {"wandb": {"run_id": "fresh"}}


def test_mlflow_batches_stay_within_its_limits_and_lose_nothing():
    """MLflow takes at most 100 params and 1,000 metrics per log_batch: 1 and 250 new params, 1,001 metrics, go
    in as few calls as those limits allow; params already logged are not sent again (MLflow refuses a new value)."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from okd.engine.tracker_sinks import MLflowTracker

    batches = []
    client = SimpleNamespace(
        get_run=lambda run_id: SimpleNamespace(data=SimpleNamespace(params={"seen": "1"})),
        log_batch=lambda run_id, params=(), metrics=(): batches.append((run_id, len(params), len(metrics))),
    )
    tracker = MLflowTracker.__new__(MLflowTracker)
    tracker.client, tracker.run_id = client, "r1"
    tracker.log_params({"seen": 1, "new": 2})
    assert batches == [("r1", 1, 0)]
    batches.clear()
    tracker.log_params({f"p{i:03d}": i for i in range(250)})
    assert batches == [("r1", 100, 0), ("r1", 100, 0), ("r1", 50, 0)]
    batches.clear()
    tracker.log_metrics({f"m{i:04d}": float(i) for i in range(1001)}, step=3)
    assert batches == [("r1", 0, 1000), ("r1", 0, 1)]
