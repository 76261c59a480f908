"""``train.eval_every``: which epochs are scored, that best.pt is chosen among them only, that an unscored epoch
never reads as a score, that the weights do not depend on it, and that it may change on resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import helpers
import pytest

from okd.engine.evaluate import is_scored
from okd.engine.trainer import config_from_run, train
from okd.errors import ConfigError
from okd.io import load_checkpoint
from okd.methods.build import load_config
from okd.report.run_results import read_run
from okd.report.tables import aggregate
from okd.runs.metrics import read_metrics_csv
from okd.runs.resume_policy import read_history

CONFIG = "cifar10/baseline_resnet20"


def tiny(root: Path, out: Path, name: str, epochs: int, **extra) -> list[str]:
    """40 training images in batches of 16 (3 steps), 16 test images."""
    settings = {"data.limit_train": 40, "data.batch_size": 16, "data.limit_test": 16, "data.test_batch_size": 16}
    return helpers.quick_overrides(root, out, name, epochs, {**settings, "seed": 3, **extra})


def test_every_nth_epoch_and_the_last_are_scored():
    cfg = SimpleNamespace(eval_every=3, epochs=7)
    assert [e for e in range(1, 8) if is_scored(e, cfg)] == [3, 6, 7]
    cfg = SimpleNamespace(eval_every=1, epochs=3)
    assert [e for e in range(1, 4) if is_scored(e, cfg)] == [1, 2, 3]
    cfg = SimpleNamespace(eval_every=10, epochs=4)
    assert [e for e in range(1, 5) if is_scored(e, cfg)] == [4]


def test_eval_every_must_be_positive():
    with pytest.raises(ConfigError, match="train.eval_every must be a positive"):
        load_config(CONFIG, ["train.eval_every=0"])


def test_best_is_chosen_among_scored_epochs_and_unscored_rows_hold_no_score(
    cifar10_root, tmp_path, monkeypatch, capsys
):
    """Scores 60 (epoch 2) and 50 (epoch 4): best.pt is epoch 2; epochs 1 and 3 have blank test columns."""
    from okd.methods.baseline import Baseline

    scores = iter([60.0, 50.0])
    monkeypatch.setattr(Baseline, "derived_metrics", lambda self, metrics: {"net/top1": next(scores)})
    run = train(
        load_config(
            CONFIG, tiny(cifar10_root, tmp_path, "every2", 4, **{"train.eval_every": 2, "train.progress": "log"})
        )
    )
    err = capsys.readouterr().err
    assert "epoch 1/4: loss=" in err and "not scored (train.eval_every)" in err
    rows = read_metrics_csv(run / "metrics.csv")
    assert [("test/net/top1" in r) for r in rows] == [False, True, False, True]
    assert [("time/eval_s" in r) for r in rows] == [False, True, False, True]
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("test/net/top1")
    assert [line.split(",")[col] for line in lines[1:]] == ["", "60", "", "50"]  # blank, never 0
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert last["best"]["epoch"] == 2 and best["epoch"] == 2
    assert best["scored_epochs"] == [2] and "scored epochs 2" in best["note"]
    result = read_run(run)
    assert result.scored_epochs == [2, 4]
    assert result.final["net/top1"] == 50.0 and result.best["net/top1"] == 60.0
    notes = aggregate([result])[0].notes
    assert any("scored only at epochs 2, 4 of 4 (train.eval_every)" in n for n in notes)


def test_weights_do_not_depend_on_eval_every_and_it_may_change_on_resume(cifar10_root, tmp_path):
    """Scored at epochs 1, 2, 3 (eval_every=1) or 1 and 3 (eval_every=2 for one epoch, then 3 on resume): the
    same weights. On resume the epochs already scored stay, the next ones follow the new interval."""
    every = train(load_config(CONFIG, tiny(cifar10_root, tmp_path, "every", 3)))
    split = train(load_config(CONFIG, tiny(cifar10_root, tmp_path, "split", 1, **{"train.eval_every": 2})))
    resumed = train(config_from_run(split, ["train.epochs=3", "train.eval_every=3"]), run_dir=split, resume=True)
    helpers.assert_same_runs(every, resumed, metrics=False)
    rows = read_metrics_csv(resumed / "metrics.csv")
    assert [("test/net/top1" in r) for r in rows] == [True, False, True]  # 1: the last of the first leg
    assert rows[-1]["test/net/top1"] == read_metrics_csv(every / "metrics.csv")[-1]["test/net/top1"]
    assert read_history(resumed)[-1]["changed"]["train.eval_every"] == {"old": 2, "new": 3}
