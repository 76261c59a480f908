"""The one reader of a run folder, okd.runs.reader.Run, on hand-made folders (fast; the fault tests in
test_faults.py stop real runs at every write boundary and read them through every command)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from okd.errors import CheckpointError, OKDError, UnsafeCheckpointError
from okd.runs.metrics import metrics_csv_text
from okd.runs.reader import Run, deploy_head_of, expand_run_dirs, load_run_method, method_from_record
from okd.runs.records import CHECKPOINT_FORMAT, RUN_KEYS, best_record
from okd.runs.store import LOCK_NAME, RunStore


def _run(folder: Path, epochs: int = 2, seed: int = 0) -> Path:
    """A run folder whose last.pt commits ``epochs`` epochs (no weights: enough for the history and config)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"seed": seed, "data": {"dataset": "cifar10"}, "model": {"name": "resnet20"}}
    cfg |= {"train": {"epochs": 3}, "method": {"name": "baseline"}}
    history = [{"epoch": e, "test/net/top1": 10.0 * e} for e in range(1, epochs + 1)]
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "metrics.csv").write_text(metrics_csv_text(history))
    last = {"format": CHECKPOINT_FORMAT, "config": cfg, "epoch": epochs, "history": history, "num_classes": 10}
    last |= {"best": {"epoch": epochs, "top1": 10.0 * epochs, "head": "net"}}
    torch.save(last | {k: {} for k in RUN_KEYS if k not in last}, folder / "last.pt")
    return folder


def test_history_stops_at_the_committed_epoch(tmp_path):
    """A metrics.csv row ahead of last.pt (a stop between the two renames) is not part of the history."""
    run = _run(tmp_path / "run", epochs=1)
    ahead = [{"epoch": 1, "test/net/top1": 10.0}, {"epoch": 2, "test/net/top1": 99.0}]
    (run / "metrics.csv").write_text(metrics_csv_text(ahead))
    reader = Run(run)
    assert reader.epoch == 1 and reader.history == [{"epoch": 1, "test/net/top1": 10.0}]
    assert reader.deploy_head == "net" and reader.best_epoch == 1 and reader.epochs == 3


def test_a_folder_without_a_commit_is_refused_naming_what_it_holds(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "deploy.pt").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"no last.pt \(it holds config.yaml, deploy.pt, none of them committed\)"
    ):
        Run(run)
    with pytest.raises(CheckpointError, match="holds no committed epoch yet"):
        expand_run_dirs([run])
    with pytest.raises(CheckpointError, match="does not exist"):
        Run(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a run folder"):
        Run(tmp_path / "file")


def test_a_foreign_or_unreadable_last_pt_is_refused(tmp_path):
    run = _run(tmp_path / "run")
    last = torch.load(run / "last.pt", weights_only=True)
    torch.save({**last, "config": {**last["config"], "seed": 5}}, run / "last.pt")
    with pytest.raises(CheckpointError, match="does not belong to the run"):
        _ = Run(run).last
    torch.save({**last, "format": "something-else"}, run / "last.pt")
    with pytest.raises(CheckpointError, match="is not an okd run checkpoint"):
        _ = Run(run).last
    (run / "last.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        _ = Run(run).last


def test_a_reader_takes_no_lock_and_reads_beside_a_writer(tmp_path):
    """A writer holds the folder; a reader still answers (it never locks), and leaves no lock file behind."""
    run = _run(tmp_path / "run")
    with RunStore(run).lock(create=False):
        assert (run / LOCK_NAME).exists() and Run(run).epoch == 2
    assert not (run / LOCK_NAME).exists()  # the writer made it and wrote nothing: it is gone again
    assert Run(run).history[-1]["epoch"] == 2
    assert not (run / LOCK_NAME).exists()


def test_a_newer_commit_is_picked_up_on_refresh(tmp_path):
    run = _run(tmp_path / "run", epochs=1)
    reader = Run(run)
    assert reader.epoch == 1 and reader.refresh() is False
    _run(run, epochs=2)
    assert reader.refresh() is True and reader.epoch == 2


def test_a_best_epoch_without_its_weights_is_refused(tmp_path):
    """last.pt says the best epoch is 1, which no file holds: best is refused (last still answers)."""
    run = _run(tmp_path / "run")
    last = torch.load(run / "last.pt", weights_only=True)
    torch.save({**last, "best": {**last["best"], "epoch": 1}}, run / "last.pt")
    with pytest.raises(CheckpointError, match="whose weights are no longer on disk"):
        Run(run).checkpoint("best")
    assert Run(run).checkpoint("last")[0]["epoch"] == 2
    record, source = Run(_run(tmp_path / "other")).checkpoint("best")  # best epoch = committed: from last.pt
    assert record["epoch"] == 2 and "last.pt" in source and record["selected_on"] == "test"


# ----------------------------------------------------------------- best.pt and deploy.pt only as last.pt commits them
def _with_best(run: Path, best_epoch: int) -> dict:
    """last.pt of ``run`` rewritten to name ``best_epoch`` as its best; returns it."""
    last = torch.load(run / "last.pt", weights_only=True)
    last["best"] = {**last["best"], "epoch": best_epoch}
    torch.save(last, run / "last.pt")
    return last


def test_best_comes_from_the_file_holding_the_best_epoch_of_this_run(tmp_path):
    """best.pt when it holds the best epoch; the kept .best.pt.prev when best.pt ran ahead; never a best.pt of
    another run (same epoch, another seed)."""
    from okd.runs.store import BEST_BACKUP

    run = _run(tmp_path / "run", epochs=3)
    last = _with_best(run, 2)
    torch.save({**last, "epoch": 2, "note": "the best"}, run / "best.pt")
    record, source = Run(run).checkpoint("best")
    assert source == str(run / "best.pt") and record["note"] == "the best"
    (run / "best.pt").rename(run / BEST_BACKUP)
    torch.save({**last, "epoch": 4}, run / "best.pt")  # an uncommitted epoch's best.pt
    record, source = Run(run).checkpoint("best")
    assert source == str(run / BEST_BACKUP) and record["epoch"] == 2
    (run / BEST_BACKUP).unlink()
    torch.save({**last, "epoch": 2, "config": {**last["config"], "seed": 9}}, run / "best.pt")
    with pytest.raises(CheckpointError, match="best epoch is 2, whose weights are no longer on disk"):
        Run(run).checkpoint("best")
    with pytest.raises(OKDError, match="unknown checkpoint 'first'"):
        Run(run).checkpoint("first")


def test_a_commit_while_best_is_read_is_followed(tmp_path, monkeypatch):
    """The best epoch's weights are gone under the last.pt first read, but a writer commits a new best epoch
    meanwhile: the reader reads last.pt again and answers from the new commit."""
    run = _run(tmp_path / "run", epochs=2)
    _with_best(run, 1)
    reader = Run(run)
    assert reader.epoch == 2
    _run(run, epochs=3)  # the writer commits epoch 3, its best
    record, source = reader.checkpoint("best")
    assert record["epoch"] == 3 and source.endswith("(its epoch is the best epoch)")


def _baseline_run(folder: Path, epochs: int = 2) -> Path:
    """A run folder of a real (untrained) baseline resnet20 network: deploy records can be rebuilt from it."""
    from okd.methods.build import build_config, build_method

    _run(folder, epochs)
    last = torch.load(folder / "last.pt", weights_only=True)
    method = build_method(build_config(last["config"]), 10)
    torch.save({**last, "method": method.state_dict()}, folder / "last.pt")
    return folder


def _deploy(run: Path, epoch: int, method: str = "baseline") -> None:
    state = {"w": torch.zeros(1)}
    deploy = {"format": "okd-deploy-v1", "model": "resnet20", "method": method, "num_classes": 10, "epoch": epoch}
    torch.save({**deploy, "state_dict": state}, run / "deploy.pt")


def test_deploy_pt_is_read_only_when_it_holds_the_committed_epoch_of_this_run(tmp_path):
    run = _baseline_run(tmp_path / "run")
    _deploy(run, 2)
    record, source = Run(run).deploy_record()
    assert source == str(run / "deploy.pt") and set(record["state_dict"]) == {"w"}
    for epoch, method in ((3, "baseline"), (1, "baseline"), (2, "dml")):  # ahead, behind, another method's
        _deploy(run, epoch, method)
        record, source = Run(run).deploy_record()
        assert source.endswith("last.pt (deploy record rebuilt)") and record["epoch"] == 2
        assert "fc.weight" in record["state_dict"] and record["method"] == "baseline"
    assert (torch.load(run / "deploy.pt", weights_only=True)["method"]) == "dml"  # the reader wrote nothing


def test_a_commit_while_deploy_pt_is_read_is_followed(tmp_path, monkeypatch):
    """deploy.pt already holds epoch 3 while the reader's last.pt says 2; once last.pt commits 3 the reader reads
    it again and takes deploy.pt."""
    from okd.runs import reader as reader_mod

    run = _baseline_run(tmp_path / "run")
    _deploy(run, 3)
    reader = Run(run)
    assert reader.epoch == 2
    real, calls = reader_mod.epoch_of, []

    def committing(path):
        if path.name == "deploy.pt" and not calls:  # the writer's last.pt rename lands now
            last = torch.load(run / "last.pt", weights_only=True)
            torch.save({**last, "epoch": 3, "history": [*last["history"], {"epoch": 3, "test/net/top1": 30.0}]},
                       run / "last.pt")  # fmt: skip
        calls.append(path.name)
        return real(path)

    (run / "metrics.csv").write_text(metrics_csv_text([{"epoch": e, "test/net/top1": 10.0 * e} for e in (1, 2, 3)]))
    monkeypatch.setattr(reader_mod, "epoch_of", committing)
    record, source = reader.deploy_record()
    assert source == str(run / "deploy.pt") and record["epoch"] == 3 and reader.epoch == 3


def test_a_reader_follows_two_commits_made_while_it_reads(tmp_path, monkeypatch):
    """best.pt is looked up against up to three successive last.pt commits before the best epoch is declared
    gone: two commits landing during one read are followed."""
    run = _run(tmp_path / "run", epochs=2)
    _with_best(run, 1)
    reader = Run(run)
    real, tries = Run._best, []

    def best_during_commits(self):
        tries.append(self.epoch)
        if len(tries) < 3:  # a writer commits the next epoch (best still gone) before this lookup ends
            _with_best(_run(run, epochs=self.epoch + 1), 1)
            return None
        return real(self)

    monkeypatch.setattr(Run, "_best", best_during_commits)
    _with_best(_run(run, epochs=2), 1)
    with pytest.raises(CheckpointError, match="whose weights are no longer on disk"):
        reader.checkpoint("best")
    assert tries == [2, 3, 4]


def test_a_run_without_a_best_epoch_has_none_to_give(tmp_path):
    run = _run(tmp_path / "run")
    last = torch.load(run / "last.pt", weights_only=True)
    torch.save({**last, "best": {}}, run / "last.pt")
    reader = Run(run)
    assert reader.best_epoch == 0
    with pytest.raises(CheckpointError, match="has no best epoch yet"):
        reader.checkpoint("best")


def test_a_last_pt_gone_before_it_is_read_is_no_commit(tmp_path):
    """A dangling last.pt link (or a last.pt removed after the folder was opened) is read as no commit at all."""
    run = _run(tmp_path / "run")
    reader = Run(run)
    (run / "last.pt").unlink()
    (run / "last.pt").symlink_to(run / "elsewhere.pt")
    with pytest.raises(CheckpointError, match=r"holds no committed epoch: no last.pt \(it holds config.yaml, metrics"):
        _ = reader.last
    with pytest.raises(CheckpointError, match="holds no committed epoch"):
        _ = Run(run).epoch


def test_a_folder_config_is_read_as_its_mapping(tmp_path):
    from okd.runs.reader import read_run_config

    (tmp_path / "config.yaml").write_text("seed: 4\nmodel: {name: resnet20}\n")
    assert read_run_config(tmp_path) == {"seed": 4, "model": {"name": "resnet20"}}
    (tmp_path / "config.yaml").write_text("")
    assert read_run_config(tmp_path) == {}
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(CheckpointError, match="does not hold a mapping"):
        read_run_config(tmp_path)
    (tmp_path / "config.yaml").write_text("seed: [1\n")
    with pytest.raises(CheckpointError, match="is not valid YAML"):
        read_run_config(tmp_path)
    with pytest.raises(CheckpointError, match="has no config.yaml; is it an okd run folder"):
        read_run_config(tmp_path / "elsewhere")


def test_deploy_pt_is_found_after_two_commits_made_while_it_is_read(tmp_path, monkeypatch):
    """deploy.pt already holds epoch 4 while the reader's last.pt says 2; last.pt commits 3, then 4, during the
    read: the reader follows both and takes deploy.pt."""
    from okd.runs import reader as reader_mod

    run = _baseline_run(tmp_path / "run")
    _deploy(run, 4)
    rows = [{"epoch": e, "test/net/top1": 10.0 * e} for e in (1, 2, 3, 4)]
    (run / "metrics.csv").write_text(metrics_csv_text(rows))
    reader = Run(run)
    assert reader.epoch == 2
    real = reader_mod.epoch_of

    def committing(path):
        epoch = reader.epoch
        if path.name == "deploy.pt" and epoch < 4:  # the writer's next last.pt lands during this lookup
            last = torch.load(run / "last.pt", weights_only=True)
            torch.save({**last, "epoch": epoch + 1, "history": rows[: epoch + 1]}, run / "last.pt")
        return real(path)

    monkeypatch.setattr(reader_mod, "epoch_of", committing)
    record, source = reader.deploy_record()
    assert source == str(run / "deploy.pt") and record["epoch"] == 4 and reader.epoch == 4


def test_the_class_count_is_last_pts_else_the_data_sets_else_refused(tmp_path):
    """A folder dataset's count lives only in last.pt; an old CIFAR record without one falls back to the data set's."""
    run = _run(tmp_path / "run")
    last = torch.load(run / "last.pt", weights_only=True)

    def record(dataset: str, stored: int | None) -> None:
        config = last["config"] | {"data": {"dataset": dataset}}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        torch.save(last | {"config": config, "num_classes": stored}, run / "last.pt")

    for dataset, stored, want in (("folder", 3, 3), ("cifar100", None, 100)):
        record(dataset, stored)
        assert Run(run).num_classes == want, (dataset, stored)
    record("folder", None)
    with pytest.raises(CheckpointError, match=r"last\.pt does not say how many classes the run has"):
        Run(run).num_classes  # noqa: B018 - the property raises


def test_a_folder_of_runs_expands_to_its_runs_in_name_order_and_anything_else_is_refused(tmp_path):
    """Run folders stand for themselves; a folder holding runs gives them sorted (its other folders skipped); an
    empty or missing folder is refused by name."""
    runs = tmp_path / "runs"
    second, first = _run(runs / "b"), _run(runs / "a")
    (runs / "c").mkdir()
    assert expand_run_dirs([second, runs]) == [second, first, second]
    for path in (tmp_path / "empty", tmp_path / "missing"):
        path.parent.mkdir(exist_ok=True)
        if path.name == "empty":
            path.mkdir()
        with pytest.raises(CheckpointError) as info:
            expand_run_dirs([first, path])
        assert str(info.value) == f"{str(path)!r} is not a run folder (no last.pt) nor a folder of runs"


def _restate(run: Path, method: str, history: list[dict]) -> None:
    """last.pt (and config.yaml, metrics.csv beside it) of ``run`` rewritten: no best head, ``method``, ``history``."""
    last = torch.load(run / "last.pt", weights_only=True)
    config = last["config"] | {"method": {"name": method}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.csv").write_text(metrics_csv_text(history))
    torch.save(last | {"config": config, "history": history, "best": {"epoch": 1}}, run / "last.pt")


def test_without_a_best_head_the_deploy_head_is_the_method_classes_else_the_last_scored_rows_first(tmp_path):
    """No head in last.pt's best: kd's class names its student; a method without one (baseline, or one okd does
    not know) takes the first top-1 head of the last scored row (train.eval_every leaves later rows unscored)."""
    run = _run(tmp_path / "run")
    scored = {"epoch": 2, "test/b/top5": 1.0, "test/c/top1": 2.0, "test/b/top1": 3.0}
    history = [{"epoch": 1, "test/a/top1": 1.0}, scored, {"epoch": 3, "train/loss": 1.0}]
    _restate(run, "kd", history)
    assert Run(run).deploy_head == "student"
    for method in ("baseline", "not_a_method"):
        _restate(run, method, history)
        assert Run(run).deploy_head == "c", method
    _restate(run, "baseline", [{"epoch": 1, "train/loss": 1.0}])
    assert Run(run).deploy_head is None


def test_the_deploy_head_of_a_folder_without_a_readable_commit_comes_from_its_config_or_heads(tmp_path):
    """A run answers from last.pt; a folder without one from its config's method class, else the first head
    given, else None; a pickled object in last.pt is refused, not passed over."""
    run = _run(tmp_path / "run")
    assert deploy_head_of(run, {"method": {"name": "kd"}}, ["x"]) == "net"
    bare = tmp_path / "bare"
    bare.mkdir()
    assert deploy_head_of(bare, {"method": {"name": "kd"}}, ["x"]) == "student"
    assert deploy_head_of(bare, {"method": {"name": "baseline"}}, ["x", "y"]) == "x"
    assert deploy_head_of(bare, {"method": {"name": "not_a_method"}}, ["x", "y"]) == "x"
    assert deploy_head_of(bare, {"method": None}, ["y"]) == "y"
    assert deploy_head_of(bare) is None
    torch.save({"format": CHECKPOINT_FORMAT, "payload": Path("x")}, run / "last.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"holds a pickled object \(pathlib\.PosixPath\)"):
        deploy_head_of(run, {"method": {"name": "kd"}}, ["x"])


def test_a_record_without_config_or_method_state_is_not_a_run_checkpoint():
    for record in ({"method": {}}, {"config": {}}):
        with pytest.raises(CheckpointError) as info:
            method_from_record(record, "x.pt")
        assert str(info.value) == "x.pt is not a run checkpoint (no config/method state); use last.pt or best.pt"


def test_a_record_without_a_class_count_takes_its_cifar_data_sets_else_is_refused(tmp_path):
    last = torch.load(_baseline_run(tmp_path / "run") / "last.pt", weights_only=True)
    del last["num_classes"]
    method = method_from_record(last, "x.pt")
    assert method.net.fc.out_features == 10 and not method.training
    folder = last | {"config": last["config"] | {"data": {"dataset": "folder"}}}
    with pytest.raises(CheckpointError) as info:
        method_from_record(folder, "x.pt")
    assert str(info.value) == "x.pt does not say how many classes the run has"


def test_a_runs_method_loads_from_its_folder_its_checkpoint_files_or_a_lone_checkpoint(tmp_path):
    """A folder or its last.pt/best.pt is read through the run (best.pt as the best epoch); any other file is
    loaded as it is. The config returned carries the overrides."""
    run = _baseline_run(tmp_path / "run")
    lone = tmp_path / "elsewhere" / "mine.pt"
    lone.parent.mkdir()
    lone.write_bytes((run / "last.pt").read_bytes())
    last = torch.load(run / "last.pt", weights_only=True)
    torch.save(best_record(last), run / "best.pt")
    want = last["method"]
    for path, source in (
        (run, str(run / "last.pt")),
        (run / "last.pt", str(run / "last.pt")),
        (run / "best.pt", str(run / "best.pt")),
        (lone, str(lone)),
        (str(lone), str(lone)),
    ):
        method, cfg, where = load_run_method(path, overrides=["seed=5", "train.epochs=7"])
        assert where == source and cfg.run.seed == 5 and cfg.method_name == "baseline", path
        assert method.ctx.epochs == 7, path  # the method is built with the overrides too
        assert not method.training and method.state_dict().keys() == want.keys(), path
        assert all(torch.equal(method.state_dict()[k], v) for k, v in want.items()), path


def test_a_deploy_pt_of_another_class_count_put_in_after_the_folder_was_read_is_refused(tmp_path):
    """deploy.pt replaced by a 100-class network of the same epoch and method once the reader has read last.pt:
    it is not returned; the reader reads the folder again and refuses it as the folder check does."""
    run = _baseline_run(tmp_path / "run")
    reader = Run(run)
    assert reader.epoch == 2
    deploy = {"format": "okd-deploy-v1", "model": "resnet20", "method": "baseline", "num_classes": 100, "epoch": 2}
    torch.save({**deploy, "state_dict": {"w": torch.zeros(1)}}, run / "deploy.pt")
    with pytest.raises(CheckpointError, match=r"deploy\.pt holds a 100-class network, but the run's data set"):
        reader.deploy_record()


def test_a_runs_best_pt_that_is_not_on_disk_is_the_best_epoch_rebuilt_from_last_pt(tmp_path):
    """RUN/best.pt names the run's best checkpoint even where no best.pt file is left: the best epoch is the
    committed one, so it is rebuilt from last.pt (not refused as a run folder named best.pt)."""
    run = _baseline_run(tmp_path / "run")
    method, cfg, source = load_run_method(run / "best.pt")
    assert source == f"{run / 'last.pt'} (its epoch is the best epoch)" and cfg.method_name == "baseline"
    assert not method.training
