"""Resume records only what is in effect: keys that may change are applied, new milestones move the restored
scheduler, recipe keys are refused by name, every resume is logged, and a last.pt of another run is refused."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import helpers
import pytest
import torch
import yaml

from okd.cli import main
from okd.engine.schedules import IterationLR
from okd.engine.trainer import train
from okd.errors import CheckpointError, ConfigError
from okd.io import load_checkpoint
from okd.methods.build import build_config, load_config
from okd.runs import resume_policy
from okd.runs.metrics import metrics_csv_text, read_metrics_csv
from okd.runs.resume_policy import MAY_CHANGE, check_belongs_to_folder, check_changes, read_history

CONFIG = "cifar10/baseline_resnet20"


def tiny(root: Path, out: Path, name: str, epochs: int, **extra) -> list[str]:
    settings = {
        "data.limit_train": 64,
        "data.limit_test": 64,
        "data.batch_size": 16,
        "data.test_batch_size": 64,
        "train.max_steps_per_epoch": 2,
        "seed": 3,
    }
    return helpers.quick_overrides(root, out, name, epochs, settings | extra)


@pytest.fixture(scope="module")
def two_epochs(cifar10_root, tmp_path_factory) -> Path:
    """A finished 2-epoch run (milestones [150, 225]: no decay yet)."""
    return train(load_config(CONFIG, tiny(cifar10_root, tmp_path_factory.mktemp("runs"), "two", 2)))


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / run.name)
    return tmp_path / run.name


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------- the policy
def _saved() -> dict:
    return build_config({"method": {"name": "dml"}, "optim": {"milestones": [2, 5]}}).to_dict()


def _asked(**dotted) -> dict:
    cfg = _saved()
    for key, value in dotted.items():
        section, _, name = key.replace("__", ".").rpartition(".")
        (cfg[section] if section else cfg)[name] = value
    return cfg


def test_keys_that_may_change_are_accepted_and_reported():
    changes = check_changes(_saved(), _asked(train__epochs=9, data__root="/elsewhere", train__progress="none"), 3)
    assert changes == {
        "data.root": ("data", "/elsewhere"),
        "train.epochs": (300, 9),
        "train.progress": ("auto", "none"),
    }
    assert {"train.epochs", "train.device", "data.root", "data.workers", "output_dir"} <= MAY_CHANGE


def test_evaluation_heartbeat_and_trackers_may_change_on_resume():
    """None of them touches the training state: the interval of test evaluations (tests/engine/test_eval_every.py
    shows the weights do not depend on it), the step lines, and where metrics are also sent."""
    asked = _asked(
        train__eval_every=5,
        train__log_every_steps=50,
        train__log_every_seconds=0.0,
        train__mlflow=True,
        train__mlflow_uri="file:/tmp/mlruns",
        train__wandb=True,
        train__tracker_project="mine",
        train__track_every_steps=10,
    )
    changes = check_changes(_saved(), asked, 3)
    assert changes["train.eval_every"] == (1, 5) and changes["train.mlflow_uri"] == (None, "file:/tmp/mlruns")
    assert len(changes) == 8


@pytest.mark.parametrize(
    ("key", "value", "saved"),
    [("optim__lr", 0.5, "0.1"), ("method__temperature", 4.0, "3.0"), ("seed", 1, "0"), ("data__batch_size", 64, "128")],
)
def test_a_recipe_key_is_refused_by_name_with_both_values(key, value, saved):
    dotted = key.replace("__", ".")
    with pytest.raises(ConfigError) as info:
        check_changes(_saved(), _asked(**{key: value}), 3)
    msg = str(info.value)
    assert msg.startswith(f"cannot change {dotted} on resume: the restored state was trained with {dotted}={saved}")
    assert f"(asked {value})" in msg and "start a new run" in msg


def test_milestones_may_change_only_after_the_epochs_trained():
    assert check_changes(_saved(), _asked(optim__milestones=[2, 7]), 3) == {"optim.milestones": ([2, 5], [2, 7])}
    with pytest.raises(ConfigError, match=r"from \[2, 5\] to \[1, 5\].*decays at \[2\]"):
        check_changes(_saved(), _asked(optim__milestones=[1, 5]), 3)
    with pytest.raises(ConfigError, match="already trained 3 epochs"):
        check_changes(_saved(), _asked(train__epochs=2), 3)


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_new_milestones_move_the_restored_scheduler(two_epochs, cifar10_root, tmp_path, monkeypatch):
    """Extending 2 epochs to 4 with a decay at 3 equals a straight 4-epoch run with milestones [3], bitwise."""
    run = _copy(two_epochs, tmp_path)
    argv = ["train", "--resume", str(run), "train.epochs=4", "optim.milestones=[3]"]
    monkeypatch.setattr(sys, "argv", ["okd", *argv])  # the command line the history records
    assert main(argv) == 0
    lrs = [row["lr/net"] for row in read_metrics_csv(run / "metrics.csv")]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01])  # the lr after each epoch: epoch 4 trains at 0.01
    straight = train(load_config(CONFIG, tiny(cifar10_root, tmp_path, "straight", 4, **{"optim.milestones": "[3]"})))
    helpers.assert_same_runs(straight, run)
    # what ran is what is saved, and the resume is on record
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved == load_checkpoint(run / "last.pt")["config"]
    assert saved["optim"]["milestones"] == [3] and saved["train"]["epochs"] == 4
    (entry,) = read_history(run)
    assert entry["resumed_after_epoch"] == 2 and entry["argv"] == ["okd", *argv]
    assert entry["changed"] == {
        "optim.milestones": {"old": [150, 225], "new": [3]},
        "train.epochs": {"old": 2, "new": 4},
    }
    assert entry["time"].endswith("Z")


def test_a_refused_key_changes_nothing(two_epochs, tmp_path, capsys):
    run = _copy(two_epochs, tmp_path)
    before = _digest(run)
    assert main(["train", "--resume", str(run), "train.epochs=3", "optim.lr=0.5"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot change optim.lr on resume: the restored state was trained with optim.lr=0.1 (asked 0.5)" in err
    assert _digest(run) == before and not read_history(run)


def test_every_resume_appends_to_the_history(two_epochs, tmp_path):
    run = _copy(two_epochs, tmp_path)
    assert main(["train", "--resume", str(run)]) == 0  # nothing to train, still recorded
    assert main(["train", "--resume", str(run), "train.progress=log"]) == 0
    first, second = read_history(run)
    assert first["changed"] == {} and second["changed"] == {"train.progress": {"old": "none", "new": "log"}}


def _plant(run: Path, edit) -> None:
    ckpt = load_checkpoint(run / "last.pt")
    edit(ckpt)
    torch.save(ckpt, run / "last.pt")


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda c: c["config"]["data"].update(dataset="cifar100"), "dataset 'cifar100' vs config.yaml's 'cifar10'"),
        (lambda c: c["config"]["method"].update(name="dml"), "method 'dml' vs config.yaml's 'baseline'"),
        (lambda c: c.update(num_classes=100), "class counts differ (last.pt: 100, cifar10: 10, deploy.pt: 10)"),
        (lambda c: c["history"][0].update({"test/net/top1": 99.5}), "metrics.csv epoch 1 disagrees"),
    ],
)
def test_a_last_pt_of_another_run_is_refused_before_anything_is_written(edit, says, two_epochs, tmp_path, capsys):
    run = _copy(two_epochs, tmp_path)
    _plant(run, edit)
    before = _digest(run)
    assert main(["train", "--resume", str(run), "train.epochs=3"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "does not belong to the run in" in err and says in err, err
    assert _digest(run) == before


# ------------------------------------------------------------------------ the folder checks and the history, unit
def _run_cfg(**changes) -> dict:
    cfg = {"method": {"name": "baseline"}, "model": {"name": "resnet20"}, "data": {"dataset": "cifar10"}, "seed": 0}
    for key, value in changes.items():
        section, _, name = key.rpartition("__")
        (cfg[section] if section else cfg)[name] = value
    return cfg


HISTORY = [
    {"epoch": 1, "train/loss": 2.5, "test/net/top1": 100 / 3, "test/net/top5": 50.0},  # written rounded to 10 digits
    {"epoch": 2, "train/loss": 2.25, "test/net/top1": 12.5, "test/net/top5": float("nan")},
]


def _folder(tmp_path: Path, csv_rows: list[dict] | None = HISTORY, deploy_classes: int | None = None) -> Path:
    from okd.runs.metrics import metrics_csv_text

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_run_cfg()))
    if csv_rows is not None:
        (tmp_path / "metrics.csv").write_text(metrics_csv_text(csv_rows))
    if deploy_classes is not None:
        state = {"w": torch.zeros(1)}
        torch.save(
            {"format": "okd-deploy-v1", "model": "resnet20", "num_classes": deploy_classes, "state_dict": state},
            tmp_path / "deploy.pt",
        )
    return tmp_path


def _ckpt(history=HISTORY, **cfg) -> dict:
    return {"config": _run_cfg(**cfg), "num_classes": 10, "history": [dict(r) for r in history]}


def _edit(rows: list[dict], index: int, **values) -> list[dict]:
    rows = [dict(r) for r in rows]
    for key, value in values.items():
        if value is None:
            del rows[index][key.replace("__", "/")]
        else:
            rows[index][key.replace("__", "/")] = value
    return rows


@pytest.mark.parametrize(
    ("rows", "says"),
    [
        (_edit(HISTORY, 1, test__net__top1=12.75), "epoch 2 disagrees with last.pt's history (test/net/top1)"),
        (_edit(HISTORY, 0, epoch=3), "metrics.csv epoch 3 disagrees with last.pt's history (epoch)"),
        (_edit(HISTORY, 1, test__net__top5=None), "epoch 2 disagrees with last.pt's history (test/net/top5)"),
        (_edit(HISTORY, 0, test__other__top1=1.0), "epoch 1 disagrees with last.pt's history (the test columns)"),
    ],
)
def test_a_metrics_csv_that_disagrees_with_the_history_is_refused(rows, says, tmp_path):
    from okd.errors import CheckpointError
    from okd.runs.resume_policy import check_belongs_to_folder

    with pytest.raises(CheckpointError) as info:
        check_belongs_to_folder(_folder(tmp_path, rows), _ckpt())
    assert f"{tmp_path / 'last.pt'} does not belong to the run in {tmp_path}" in str(info.value)
    assert says in str(info.value)


@pytest.mark.parametrize(
    "rows",
    [
        HISTORY,  # the same, as written (NaN equals NaN, 100/3 rounded)
        _edit(HISTORY, 0, train__loss=9.0),  # only the epoch and the test columns are compared
        HISTORY[:1],  # lagging one epoch behind last.pt (a stop in mid-save)
        [*HISTORY, {**HISTORY[1], "epoch": 3}],  # one epoch ahead of last.pt (a stop before its rename)
        None,  # no metrics.csv
    ],
)
def test_a_metrics_csv_in_line_with_the_history_is_accepted(rows, tmp_path):
    from okd.runs.resume_policy import check_belongs_to_folder

    check_belongs_to_folder(_folder(tmp_path, rows), _ckpt())


def test_the_folder_checks_name_seed_and_deploy_class_count(tmp_path):
    from okd.errors import CheckpointError
    from okd.runs.resume_policy import check_belongs_to_folder

    with pytest.raises(CheckpointError, match=r"seed 1 vs config.yaml's 0"):
        check_belongs_to_folder(_folder(tmp_path), _ckpt(seed=1))
    with pytest.raises(CheckpointError, match=r"model 'wrn16_2' vs config.yaml's 'resnet20'"):
        check_belongs_to_folder(_folder(tmp_path), _ckpt(model__name="wrn16_2"))
    with pytest.raises(CheckpointError, match=r"deploy.pt holds a 100-class network, but the run's data set \(cifar"):
        check_belongs_to_folder(_folder(tmp_path, deploy_classes=100), _ckpt())
    check_belongs_to_folder(_folder(tmp_path, deploy_classes=10), _ckpt())


def test_a_resume_line_is_on_disk_before_record_resume_returns(tmp_path, monkeypatch):
    """The history is appended, flushed and fsync'd: at the fsync the new line is already in the file."""
    import os

    from okd.runs import resume_policy

    path = tmp_path / resume_policy.HISTORY_FILE
    path.write_text('{"earlier": 1}\n')
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((os.fstat(fd).st_ino, path.read_text().splitlines()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    resume_policy.record_resume(tmp_path, 4, {"train.epochs": (4, 6)})
    ((inode, lines),) = synced
    assert inode == path.stat().st_ino and len(lines) == 2
    first, entry = read_history(tmp_path)
    assert first == {"earlier": 1} and entry["resumed_after_epoch"] == 4
    assert entry["changed"] == {"train.epochs": {"old": 4, "new": 6}}


def test_refusals_list_the_keys_that_may_change():
    with pytest.raises(ConfigError) as info:
        check_changes(_saved(), _asked(optim__lr=0.5, seed=2), 3)
    msg = str(info.value)
    assert msg.startswith("cannot change optim.lr, seed on resume:")
    assert "optim.lr=0.1 (asked 0.5), seed=0 (asked 2)" in msg
    assert "Keys that may change on resume: data.download, data.pin_memory, data.root" in msg
    with pytest.raises(ConfigError, match=r"give train.epochs >= 3"):
        check_changes(_saved(), _asked(train__epochs=2), 3)
    assert check_changes(_saved(), _asked(train__epochs=3), 3) == {"train.epochs": (300, 3)}


def test_the_history_of_a_run_never_resumed_is_empty_and_blank_lines_are_skipped(tmp_path):
    from okd.runs.resume_policy import HISTORY_FILE

    assert read_history(tmp_path) == []
    (tmp_path / HISTORY_FILE).write_text('{"resumed_after_epoch": 1}\n\n  \n{"resumed_after_epoch": 3}\n')
    assert [e["resumed_after_epoch"] for e in read_history(tmp_path)] == [1, 3]


def _paper_schedule(milestones: list[int]) -> IterationLR:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return IterationLR(optimizer, "ffsd_imagenet_paper", steps_per_epoch=10, milestones=milestones, gamma=0.1)


def test_new_milestones_move_a_restored_per_iteration_schedule():
    """An IterationLR restored at iteration 25 (epoch 2, decayed once under [2, 4]) given milestones [3, 4]:
    its lr is the closed form under the new milestones at once (undecayed), in the restored optimizer too."""
    old = _paper_schedule([2, 4])
    for _ in range(25):
        old.optimizer.step()
        old.step()
    assert old.get_last_lr() == pytest.approx([0.01])
    new = _paper_schedule([3, 4])

    def load_state_dict(ckpt: dict) -> None:  # as the optimization plan restores: optimizer, then scheduler
        new.optimizer.load_state_dict(ckpt["optimizer"])
        new.load_state_dict(ckpt["scheduler"])

    plan = SimpleNamespace(schedulers=[new], load_state_dict=load_state_dict)
    resume_policy.restore_optimization(plan, {"optimizer": old.optimizer.state_dict(), "scheduler": old.state_dict()})
    assert new.last_epoch == 25 and new.milestones == [3, 4]
    assert new.get_last_lr() == [0.1] and new.optimizer.param_groups[0]["lr"] == 0.1
    new.optimizer.step()
    for _ in range(5):
        new.step()
    assert new.get_last_lr() == pytest.approx([0.01])  # iteration 30: epoch 3, the new first milestone


@pytest.mark.parametrize("text", ["seed: [1\n", "- a list\n"])
def test_a_config_yaml_that_cannot_be_read_as_a_mapping_is_not_compared(tmp_path, text):
    """An unparsable config.yaml, or one holding a list, says nothing about the run: last.pt is not refused over
    it (its seed differs from the folder's usual one here), and the other folder checks still run."""
    folder = _folder(tmp_path)
    (folder / "config.yaml").write_text(text)
    check_belongs_to_folder(folder, _ckpt(seed=1))
    (folder / "metrics.csv").write_text(metrics_csv_text(_edit(HISTORY, 1, test__net__top1=12.75)))
    with pytest.raises(CheckpointError, match=r"metrics.csv epoch 2 disagrees with last.pt's history"):
        check_belongs_to_folder(folder, _ckpt(seed=1))


def test_a_metrics_csv_that_cannot_be_read_is_left_to_the_next_save(tmp_path, monkeypatch):
    """A metrics.csv with a value that is not a number, or one the system cannot read, is not compared: the next
    save rewrites it from last.pt's history."""
    folder = _folder(tmp_path, csv_rows=None)
    (folder / "metrics.csv").write_text("epoch,test/net/top1\n1,not a number\n")
    check_belongs_to_folder(folder, _ckpt())

    def unreadable(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(resume_policy, "read_metrics_csv", unreadable)
    check_belongs_to_folder(_folder(tmp_path, _edit(HISTORY, 1, test__net__top1=12.75)), _ckpt())


def test_a_deploy_pt_checked_against_last_pt_alone_or_the_data_set_alone_names_the_right_source(tmp_path):
    """With one other count to compare with: last.pt's own (a folder data set, unknown to okd) gives "class counts
    differ"; the data set's (a last.pt without a count) names the data set as the source."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "cifar").mkdir()
    folder_run = _folder(tmp_path / "folder", deploy_classes=100)
    (folder_run / "config.yaml").write_text(yaml.safe_dump(_run_cfg(data__dataset="imagenet")))
    with pytest.raises(CheckpointError, match=r"class counts differ \(last.pt: 10, deploy.pt: 100\)"):
        check_belongs_to_folder(folder_run, _ckpt(data__dataset="imagenet"))
    uncounted = {k: v for k, v in _ckpt().items() if k != "num_classes"}
    with pytest.raises(
        CheckpointError, match=r"deploy.pt holds a 100-class network, but the run's data set \(cifar10\)"
    ):
        check_belongs_to_folder(_folder(tmp_path / "cifar", deploy_classes=100), uncounted)
