"""What a run says while and after it trains: epoch k/N, run ETA, bars, the deployed head, the closing summary,
evaluation time, the torch thread count; and ``okd test`` on a run folder or its deploy.pt."""

from __future__ import annotations

import io
import logging
import pickle
import sys

import conftest
import helpers
import numpy as np
import pytest

from okd.cli import main
from okd.data.cifar import load_cifar
from okd.engine import threads
from okd.engine.run_log import epoch_line, format_duration, live_eta, run_eta, run_summary
from okd.engine.trainer import train
from okd.log import setup_logging
from okd.methods.build import load_config
from okd.runs.metrics import best_in_history, read_metrics_csv

EPOCHS = 2


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def okd_log():
    setup_logging()  # okd's own handler and level first
    handler = _Records()
    logger = logging.getLogger("okd")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def ffsd_run(cifar10_root, tmp_path_factory):
    """A 2-epoch, 2-step FFSD run with the interactive display (bars), its log lines and its stderr."""
    out = tmp_path_factory.mktemp("runs")
    settings = {
        "data.limit_train": 64,
        "data.limit_test": 100,
        "data.batch_size": 32,
        "data.test_batch_size": 50,
        "train.max_steps_per_epoch": 2,
        "train.progress": "bar",
    }
    overrides = helpers.quick_overrides(cifar10_root, out, "ffsd", EPOCHS, settings)
    setup_logging()  # okd's own handler and level first
    handler = _Records()
    logger = logging.getLogger("okd")
    logger.addHandler(handler)
    mp = pytest.MonkeyPatch()
    err = io.StringIO()
    mp.setattr(sys, "stderr", err)
    try:
        run_dir = train(load_config("cifar10/ffsd_resnet20", overrides))
    finally:
        mp.undo()
        logger.removeHandler(handler)
    return run_dir, handler.lines, err.getvalue()


def test_epoch_lines_say_k_of_n_mark_the_deployed_head_and_give_the_eta(ffsd_run):
    run_dir, _, err = ffsd_run
    lines = [line for line in err.splitlines() if line.startswith("epoch ") and ": loss=" in line]
    assert [line.split(":")[0] for line in lines] == [f"epoch {k}/{EPOCHS}" for k in range(1, EPOCHS + 1)]
    rows = read_metrics_csv(run_dir / "metrics.csv")
    for line, row in zip(lines, rows, strict=True):
        heads = line.split("top1 [")[1].split("]")[0].split()
        assert heads[0] == f"*leader={row['test/leader/top1']:.2f}"  # the deployed head first, marked
        assert len(heads) == 7 and sum(h.startswith("*") for h in heads) == 1
        assert f"eval {row['time/eval_s']:.1f}s" in line
    assert "run ETA" in lines[0] and "run ETA" not in lines[-1]


def test_bars_show_epoch_of_n_the_run_eta_and_evaluation(ffsd_run):
    _, _, err = ffsd_run
    assert f"epoch 1/{EPOCHS}" in err and f"epoch {EPOCHS}/{EPOCHS}" in err
    assert "eval:" in err  # the evaluation bar
    bars = [part for part in err.replace("\r", "\n").splitlines() if "%|" in part]
    assert any(b.startswith("epoch 1/") and "run ETA" in b for b in bars)  # the training bar's postfix
    assert any(b.startswith(f"epoch {EPOCHS}/") and "run ETA" in b for b in bars)


def test_evaluation_time_is_recorded_beside_the_epoch_time(ffsd_run):
    run_dir, _, _ = ffsd_run
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header.index("time/eval_s") == header.index("time/images_per_s") + 1 == header.index("time/epoch_s") + 2
    assert all(row["time/eval_s"] > 0 for row in read_metrics_csv(run_dir / "metrics.csv"))


def test_run_ends_with_a_summary(ffsd_run):
    run_dir, lines, _ = ffsd_run
    rows = read_metrics_csv(run_dir / "metrics.csv")
    best = max(r["test/leader/top1"] for r in rows)
    best_epoch = next(int(r["epoch"]) for r in rows if r["test/leader/top1"] == best)
    start = next(line for line in lines if "torch threads" in line)
    assert "torch threads 1" in start and f"{EPOCHS} epochs" in start
    assert lines[-4:] == [
        f"deployed head: leader, top-1 {rows[-1]['test/leader/top1']:.2f} at epoch {EPOCHS}",
        f"best top-1 of leader: {best:.2f} at epoch {best_epoch} (selected on test: optimistic)",
        f"deploy.pt: {run_dir / 'deploy.pt'}",
        lines[-1],
    ]
    assert lines[-1].startswith("wall time: ") and lines[-1].endswith("s")


def test_okd_test_ends_with_a_summary_and_scores_deploy_pt(ffsd_run, capsys):
    run_dir, _, _ = ffsd_run
    last = read_metrics_csv(run_dir / "metrics.csv")[-1]
    top1 = f"{last['test/leader/top1']:.2f}"
    assert main(["test", str(run_dir), "--checkpoint", "last", "train.device=cpu"]) == 0
    out = capsys.readouterr().out
    assert f"deployed head: leader, top-1 {top1} at epoch {EPOCHS}" in out
    assert "(selected on test: optimistic)" in out and f"deploy.pt: {run_dir / 'deploy.pt'}" in out
    assert "wall time: " in out and "*leader " in out
    assert main(["test", str(run_dir / "deploy.pt")]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[0].splitlines()
    assert len(table) == 3 and table[2].split()[:2] == ["*leader", top1]  # one network: the deployed leader
    assert f"deployed head: leader, top-1 {top1} at epoch {EPOCHS}" in out


def test_deploy_pt_without_its_run_config_is_refused_clearly(ffsd_run, tmp_path, capsys):
    run_dir, _, _ = ffsd_run
    alone = tmp_path / "deploy.pt"
    alone.write_bytes((run_dir / "deploy.pt").read_bytes())
    assert main(["test", str(alone)]) == 2
    assert "config.yaml" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the pieces


def test_epoch_line_lists_the_deployed_head_first():
    row = {"epoch": 3, "train/loss": 1.0, "time/epoch_s": 2.0, "time/images_per_s": 10.0, "time/eval_s": 1.5}
    row |= {"test/a/top1": 1.0, "test/leader/top1": 2.0, "test/z/top1": 3.0}
    line = epoch_line(row, ["z", "a", "leader"], 10, "leader", 75.0)
    assert line == (
        "epoch 3/10: loss=1.0000 top1 [*leader=2.00 a=1.00 z=3.00] train 2.0s (10 img/s) + eval 1.5s, run ETA 1m15s"
    )
    assert "[a=1.00 leader=2.00 z=3.00]" in epoch_line(row, ["z", "a", "leader"], 10)


def test_durations_eta_and_best():
    assert [format_duration(s) for s in (4.4, 65, 3 * 3600 + 7 * 60, 2 * 86400 + 5 * 3600)] == [
        "4s",
        "1m05s",
        "3h07m",
        "2d05h",
    ]
    assert run_eta([], 5) is None and run_eta([10.0, 20.0], 0) is None and run_eta([10.0, 20.0], 4) == 60.0
    assert live_eta([10.0, 20.0], 2, 0.5, 4, 10) == 32.0 and live_eta([], 2, 0.5, 4, 10) == 12.0
    history = [{"epoch": 1, "test/h/top1": 5.0}, {"epoch": 2, "test/h/top1": 7.0}, {"epoch": 3, "test/h/top1": 7.0}]
    assert best_in_history(history, "h") == (7.0, 2) and best_in_history(history, "other") is None
    text = run_summary("h", 7.0, 3, (7.0, 2), None, 61)
    assert text.splitlines() == [
        "deployed head: h, top-1 7.00 at epoch 3",
        "best top-1 of h: 7.00 at epoch 2 (selected on test: optimistic)",
        "deploy.pt: (none)",
        "wall time: 1m01s",
    ]


def test_thread_warning_counts_the_cores_that_are_free(monkeypatch, okd_log):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert threads.free_cores() == 1  # 4 cores - round(2.6)
    assert threads.thread_warning(1) is None
    message = threads.thread_warning(4)
    assert "torch uses 4 threads but only 1 of 4 cores are free" in message and "OMP_NUM_THREADS=1" in message
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert threads.free_cores() == 1  # floored at one
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert threads.thread_warning(4) is None

    monkeypatch.setattr(threads, "_warned", False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 3)
    threads.warn_threads_once()
    threads.warn_threads_once()
    assert sum("torch uses 3 threads" in line for line in okd_log) == 1


def test_cores_and_load_where_the_os_has_no_affinity_or_load_average(monkeypatch):
    """macOS and Windows: every core counts; Windows has no load average, so none is taken as busy."""
    monkeypatch.delattr(threads.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 6)
    assert threads.usable_cores() == 6
    monkeypatch.setattr(threads.os, "cpu_count", lambda: None)
    assert threads.usable_cores() == 1

    def no_load_average():
        raise OSError("load average unobtainable")

    monkeypatch.setattr(threads.os, "getloadavg", no_load_average)
    assert threads.load_average() == 0.0
    monkeypatch.delattr(threads.os, "getloadavg")
    assert threads.load_average() == 0.0 and threads.free_cores() == 1


# ---------------------------------------------------------------------------- the user's own CIFAR-10


def _official_layout(folder, per_class_train=210, per_class_test=55):
    """A tiny CIFAR-10 folder in the official python layout (labels cycling over the ten classes)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def dump(name, n):
        labels = [i % 10 for i in range(n)]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)

    for b in range(1, 6):
        dump(f"data_batch_{b}", per_class_train * 2)
    dump("test_batch", per_class_test * 10)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_tests_run_on_the_users_own_cifar10(tmp_path, point_at):
    source = tmp_path / "mine" / "cifar-10-batches-py"
    _official_layout(source)
    root = conftest.prepare_cifar10(tmp_path / "out", str(source.parent if point_at == "parent" else source))
    train_split = load_cifar(root, "cifar10", train=True)
    test_split = load_cifar(root, "cifar10", train=False)
    assert train_split.images.shape == (2000, 3, 32, 32) and test_split.images.shape == (500, 3, 32, 32)
    assert (np.bincount(train_split.labels, minlength=10) == 200).all()
    assert (np.bincount(test_split.labels, minlength=10) == 50).all()


def test_a_wrong_cifar10_folder_or_none_says_how_to_enable(tmp_path, monkeypatch):
    with pytest.raises(pytest.UsageError, match="cifar-10-batches-py"):
        conftest.prepare_cifar10(tmp_path / "out", str(tmp_path))
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "absent")
    with pytest.raises(pytest.skip.Exception, match="OKD_CIFAR10="):
        conftest.prepare_cifar10(tmp_path / "out", None)


@pytest.mark.parametrize(
    "config, head",
    [("cifar10/ffsd_resnet20", "leader"), ("cifar10/dml_resnet32", "net0"), ("cifar10/baseline_resnet20", "net")],
)
def test_a_deploy_pt_is_scored_under_its_training_head_name(config, head):
    import torch

    from okd.report.scoring import _deployed_head_name

    batch = [(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))]
    assert _deployed_head_name(load_config(config), 10, batch) == head
