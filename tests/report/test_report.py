"""Reports: published figures as data, mean ± std tables, seed sweeps, curves, attention maps, TensorBoard."""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
import sys
from pathlib import Path

import helpers
import pytest
import torch
import yaml

from okd.errors import OKDError
from okd.report.published import find_published, load_published
from okd.report.tables import build_report, to_csv, to_markdown
from okd.runs.metrics import metrics_csv_text
from okd.runs.records import CHECKPOINT_FORMAT, RUN_KEYS

SPEC = helpers.REPO.parent / "shared" / "spec" / "reported-results.md"
CONFIG = "cifar10/baseline_resnet20"


def quick(root: Path) -> list[str]:
    return [
        f"data.root={root}",
        "data.download=false",
        "data.limit_train=64",
        "data.limit_test=64",
        "data.batch_size=16",
        "data.test_batch_size=64",
        "train.epochs=2",
        "train.max_steps_per_epoch=1",
        "train.progress=none",
    ]


# --------------------------------------------------------------------------------------------- published data
def test_published_rows_parse_and_cover_the_spec():
    rows = load_published()
    assert len(rows) > 300
    for r in rows:
        float(r.value)
        assert r.std == "" or float(r.std) >= 0
        assert r.kind in ("top1", "gain", "cosine")
        assert r.head == "" or r.okd_method, r
    leader = [r for r in find_published("ffsd", "resnet32", "cifar100") if r.head == "leader"]
    assert (leader[0].value, leader[0].std, leader[0].table) == ("74.85", "0.05", "Table I")
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} not available")
    by_row: dict[int, list] = {}
    for r in rows:
        by_row.setdefault(r.spec_row, []).append(r)
    for line in SPEC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| (\d+) \|(.*)\|\s*$", line)
        if not m:
            continue
        cells = [c.strip() for c in m.group(2).split("|")]
        printed = [re.match(r"\d+(\.\d+)?", part).group() for part in cells[4].split(" / ")]
        ours = by_row[int(m.group(1))]
        assert [r.value for r in ours] == printed, (m.group(1), cells[4])
        assert all(r.std == cells[5] for r in ours), m.group(1)
        assert all(r.dataset == cells[0] and r.backbone == cells[1] for r in ours), m.group(1)
    assert {n for n in by_row if n <= 305} == set(range(1, 306))  # every row of the spec's table
    later = {r.source for n, rs in by_row.items() if n > 305 for r in rs}  # rows of other sources follow it
    assert later <= {"SwitOKD README", "MCL README", "L-MCL README"}, later


def test_published_variants_do_not_mix():
    default = {"num_students": 2, "diversity": "attention", "self_distillation": "both", "feature_fusion": True}
    heads: dict[str, str] = {}
    for r in find_published("ffsd", "resnet32", "cifar100", default, default):  # preferred source first
        heads.setdefault(r.head, r.value)
    assert heads["leader"] == "74.85" and heads["fusion"] == "76.04"
    no_sd = {**default, "self_distillation": "none"}
    assert {r.value for r in find_published("ffsd", "resnet32", "cifar100", no_sd, default) if r.head == "leader"} == {
        "73.94"
    }
    no_fusion = {**default, "feature_fusion": False, "self_distillation": "students"}
    assert [r.value for r in find_published("ffsd", "resnet32", "cifar100", no_fusion, default)] == ["74.06"]


# --------------------------------------------------------------------------------------- hand-made arithmetic
def _fake_run(
    folder: Path, seed: int, epochs: list[dict[str, float]], method: str = "ffsd", data: dict | None = None
) -> Path:
    folder.mkdir(parents=True)
    cfg = {"name": folder.name, "seed": seed, "data": {"dataset": "cifar100", **(data or {})}}
    cfg |= {"model": {"name": "resnet32"}, "train": {"epochs": len(epochs)}, "method": {"name": method}}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    history = [{"epoch": i, **row} for i, row in enumerate(epochs, start=1)]
    (folder / "metrics.csv").write_text(metrics_csv_text(history))
    last = {"format": CHECKPOINT_FORMAT, "config": cfg, "epoch": len(history), "history": history}
    torch.save(last | {k: {} for k in RUN_KEYS if k not in last} | {"best": {"epoch": 0}}, folder / "last.pt")
    return folder


def test_report_arithmetic_on_hand_made_runs(tmp_path):
    leader = {1: (75.5, 73.0), 2: (74.5, 74.0), 3: (76.0, 75.0)}  # seed: (epoch 1, epoch 2) top-1
    runs = []
    for seed, (e1, e2) in leader.items():
        rows = [
            {"test/leader/top1": e1, "test/leader/top5": 90.0 + seed, "test/student0/top1": 70.0 + seed,
             "test/student1/top1": 72.0, "train/loss": 1.0},
            {"test/leader/top1": e2, "test/leader/top5": 91.0, "test/student0/top1": 71.0,
             "test/student1/top1": 71.0 + seed, "train/loss": 0.5},
        ]  # fmt: skip
        runs.append(_fake_run(tmp_path / "runs" / f"ffsd_s{seed}", seed, rows))
    groups = build_report([tmp_path / "runs"])  # a folder of runs expands
    assert len(groups) == 1 and len(groups[0].runs) == 3
    rows = {r.head: r for r in groups[0].rows}
    assert set(rows) == {"leader", "student0", "student1", "avg(student*)"}
    final = [73.0, 74.0, 75.0]
    best = [75.5, 74.5, 76.0]
    lead = rows["leader"]
    assert lead.deployed and lead.n == 3 and lead.seeds == [1, 2, 3]
    assert lead.stats["final/top1"] == pytest.approx((statistics.fmean(final), statistics.pstdev(final)), abs=1e-12)
    assert lead.stats["best/top1"] == pytest.approx((statistics.fmean(best), statistics.pstdev(best)), abs=1e-12)
    assert lead.stats["final/top5"] == pytest.approx((91.0, 0.0))
    assert lead.stats["best/top5"] == pytest.approx((92.0, math.sqrt(2 / 3)))
    assert lead.published.value == "74.85" and lead.published.std == "0.05"
    assert lead.diff("final") == pytest.approx(74.0 - 74.85)
    assert lead.diff("best") == pytest.approx(statistics.fmean(best) - 74.85)
    # the per-epoch mean of the students: epoch 1 (70+s+72)/2, epoch 2 (71+71+s)/2
    avg_final = [(71 + 71 + s) / 2 for s in (1, 2, 3)]
    avg_best = [max((70 + s + 72) / 2, (71 + 71 + s) / 2) for s in (1, 2, 3)]
    avg = rows["avg(student*)"]
    assert avg.stats["final/top1"] == pytest.approx((statistics.fmean(avg_final), statistics.pstdev(avg_final)))
    assert avg.stats["best/top1"] == pytest.approx((statistics.fmean(avg_best), statistics.pstdev(avg_best)))
    assert avg.published.value == "74.25"  # FFSD Table IV "2-net average"

    md = to_markdown(groups)
    assert "population std, ddof=0" in md and "best (selected on test)" in md
    assert "| **leader** (deployed) | 74.00 ± 0.82 | 75.33 ± 0.62 | 91.00 ± 0.00 | 92.00 ± 0.82 | 74.85 ± 0.05 |" in md
    assert "| -0.85 | +0.48 | FFSD paper, Table I (leader (deployed))" in md
    table = list(csv.DictReader(io.StringIO(to_csv(groups))))
    lead_row = next(r for r in table if r["head"] == "leader")
    assert float(lead_row["final_top1_mean"]) == pytest.approx(74.0, abs=1e-9)
    assert float(lead_row["final_top1_std"]) == pytest.approx(math.sqrt(2 / 3), abs=1e-9)
    assert float(lead_row["best_top1_mean"]) == pytest.approx(226 / 3, abs=1e-9)
    assert float(lead_row["diff_final_top1"]) == pytest.approx(-0.85, abs=1e-9)
    assert lead_row["published_spec_row"] == "13" and lead_row["n_runs"] == "3" and lead_row["seeds"] == "1 2 3"
    assert "74.82" in lead_row["other_published"]  # the README runs and Table II stay visible


def test_report_keeps_variants_and_epochs_apart(tmp_path):
    row = [{"test/net/top1": 50.0}]
    _fake_run(tmp_path / "a", 1, row, method="baseline")
    _fake_run(tmp_path / "b", 2, row * 2, method="baseline")
    groups = build_report([tmp_path / "a", tmp_path / "b"])
    assert [len(g.runs) for g in groups] == [1, 1]


def test_report_warns_when_runs_are_not_comparable(tmp_path):
    row = {"test/leader/top1": 60.0, "test/student0/top1": 59.0, "test/student1/top1": 58.0}
    short = _fake_run(tmp_path / "short", 1, [row], data={"limit_train": 256, "limit_test": 100})
    torch.save({"format": "okd-deploy-v1", "num_classes": 10, "state_dict": {}}, short / "deploy.pt")
    (g,) = build_report([short])
    assert g.caveats == [
        "trained on a subset of the training images (data.limit_train=256)",
        "scored on a subset of the test images (data.limit_test=100)",
        "1 epoch(s) trained; the recipe (cifar100/ffsd_resnet32) trains 299",
        "the runs classify 10 classes; cifar100, as published, has 100",
    ]
    assert f"**Not comparable with the published figures:** {'; '.join(g.caveats)}." in to_markdown([g])
    table = list(csv.DictReader(io.StringIO(to_csv([g]))))
    assert {r["not_comparable"] for r in table} == {"; ".join(g.caveats)}
    full = _fake_run(tmp_path / "full", 1, [row] * 299)  # the recipe's length, all the data
    torch.save({"format": "okd-deploy-v1", "num_classes": 100, "state_dict": {}}, full / "deploy.pt")
    (g,) = build_report([full])
    assert g.caveats == [] and "Not comparable" not in to_markdown([g])


def test_report_names_each_other_source_once(tmp_path):
    run = _fake_run(tmp_path / "base", 1, [{"test/net/top1": 69.0}], method="baseline")
    (g,) = build_report([run])
    (net,) = g.rows
    assert net.published.value == "69.96" and [o.value for o in net.others].count("70.02") == 2  # CMFF's 2 rows
    md = to_markdown([g])
    assert md.count("70.02 (CMFF README)") == 1 and "; also 69.96 (FFSD paper, Table II); 70.02 (CMFF README) |" in md


# ------------------------------------------------------------------------------------ real runs: sweep+report
@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory, cifar10_root) -> list[Path]:
    from okd.report.sweep import run_sweep

    out = tmp_path_factory.mktemp("sweep")
    return run_sweep(CONFIG, [1, 2, 3], [*quick(cifar10_root), f"output_dir={out}", "name=base"])


def test_sweep_prints_commands(cifar10_root):
    text = helpers.cli("sweep", CONFIG, "--seeds", "4", "5", "train.epochs=3", "--print")
    lines = text.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("train.epochs=3 seed=4 name=cifar10_baseline_resnet20_s4")
    assert "seed=5 name=cifar10_baseline_resnet20_s5" in lines[1]


def test_report_three_seeds(seed_runs, tmp_path):
    assert [p.name for p in seed_runs] == ["base_s1", "base_s2", "base_s3"]
    md_path, csv_path = tmp_path / "r.md", tmp_path / "r.csv"
    text = helpers.cli("report", *seed_runs, "--markdown", md_path, "--csv", csv_path)
    assert md_path.read_text() in text
    from okd.runs.metrics import read_metrics_csv

    hist = [read_metrics_csv(p / "metrics.csv") for p in seed_runs]
    for metric in ("top1", "top5"):
        final = [h[-1][f"test/net/{metric}"] for h in hist]
        best = [max(r[f"test/net/{metric}"] for r in h) for h in hist]
        cells = f"{statistics.fmean(final):.2f} ± {statistics.pstdev(final):.2f}"
        assert cells in text
        assert f"{statistics.fmean(best):.2f} ± {statistics.pstdev(best):.2f}" in text
    assert "| **net** (deployed) |" in text and "3 run(s), seeds 1, 2, 3; 2 epochs." in text
    rows = list(csv.DictReader(open(csv_path)))
    assert [(r["head"], r["n_runs"], r["seeds"]) for r in rows] == [("net", "3", "1 2 3")]


# ---------------------------------------------------------------------------------------- plots and attention
def test_plot_curves(seed_runs, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    out = tmp_path / "curves.png"
    assert f"wrote {out}" in helpers.cli("plot", seed_runs[0], "--out", out)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 500


def test_attention_ffsd_students_and_leader(tmp_path_factory, cifar10_root, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    run = helpers.trained(tmp_path_factory, cifar10_root, "cifar10/ffsd_resnet20", "ffsd")
    out = tmp_path / "att.png"
    text = helpers.cli("attention", run, "--images", "4", "--out", out, "--similarity-images", "48")
    assert "(student0, student1, leader)" in text
    assert "| student0 | student1 |" in text
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[1] > im.size[0]  # 4 rows of image + 3 maps
    sim = list(csv.DictReader(open(tmp_path / "att_similarity.csv")))
    assert [(r["network_a"], r["network_b"]) for r in sim] == [
        ("student0", "student1"),
        ("student0", "leader"),
        ("student1", "leader"),
    ]
    assert all(0.0 < float(r["cosine"]) <= 1.0 and r["images"] == "48" for r in sim)
    assert (tmp_path / "att_similarity.png").is_file()


def test_attention_maps_and_similarity_math():

    from okd.report.attention import similarity

    a = torch.rand(5, 1, 4, 4)
    cos, cen = similarity({"x": a, "y": a * 3.0, "z": -a + 2})
    assert cos[0, 1] == pytest.approx(1.0) and cen[0, 1] == pytest.approx(1.0)
    assert cen[0, 2] == pytest.approx(-1.0)
    flat = a.flatten(1)
    expected = torch.nn.functional.cosine_similarity(flat, (-a + 2).flatten(1)).mean().item()
    assert cos[0, 2] == pytest.approx(expected)


def test_tap_networks_are_named_like_heads():
    from torch import nn

    from okd.models import create_model
    from okd.report.attention import tap_networks

    class Cohort(nn.Module):
        def __init__(self):
            super().__init__()
            self.students = nn.ModuleList(create_model("resnet20", 10) for _ in range(2))
            self.fusion = nn.Sequential(nn.Conv2d(128, 64, 1))
            self.leader = create_model("resnet20", 10)

        def deployable(self):
            return self.leader

    class NoTaps(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(2, 2)

        def deployable(self):
            return create_model("resnet20", 10)

    assert list(tap_networks(Cohort())) == ["student0", "student1", "leader"]
    assert list(tap_networks(NoTaps())) == ["deployed"]


def test_missing_matplotlib_names_the_extra(seed_runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    from okd.report.plots import plot_curves

    with pytest.raises(OKDError, match=re.escape('pip install "okd[plot]"')):
        plot_curves(seed_runs[0])


# ------------------------------------------------------------------------------------------------ tensorboard
def test_tensorboard_logger(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from okd.engine.tensorboard import TensorBoardLogger

    with TensorBoardLogger(tmp_path) as tb:
        tb.log_row({"epoch": 1, "train/loss": 2.5, "test/net/top1": 10.0, "bad": float("nan")}, step=1)
        tb.log_row({"epoch": 2, "train/loss": 1.5, "test/net/top1": 20.0}, step=2)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "test/net/top1"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 1.5)]


def test_tensorboard_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    from okd.engine.tensorboard import TensorBoardLogger

    with pytest.raises(OKDError, match=re.escape('pip install "okd[tensorboard]"')):
        TensorBoardLogger(tmp_path)
