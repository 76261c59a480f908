"""okd compare: methods side by side under one recipe; the arithmetic on hand-made runs, the refusal (or the
marked table) for mixed recipes, and a comparison of small real runs (two methods, two seeds, a few steps)."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

import helpers
import pytest
from recipe_fixtures import fake_run, timed

from okd.errors import ConfigError
from okd.report.compare import build_comparison, paper_metric, to_csv, to_markdown
from okd.report.run_results import read_run
from okd.report.sweep import run_sweep
from okd.runs.metrics import read_metrics_csv


def _dml(folder: Path, seed: int, net0: tuple[float, float], others: dict[str, float], recipe: str = "ffsd") -> Path:
    rows = [
        timed({"test/net0/top1": net0[0], "test/net1/top1": 10.0, "test/oracle_any_net/top1": 99.0}, 200.0, 18.0),
        timed({"test/net0/top1": net0[1], **others, "test/oracle_any_net/top1": 99.0}, 100.0, 36.0, 4.0),
    ]
    return fake_run(folder, "cifar100/dml_resnet32", [f"recipe={recipe}", f"seed={seed}"], rows)


def _baseline(folder: Path, seed: int, final: float, recipe: str = "ffsd", world_size: int = 1) -> Path:
    rows = [timed({"test/net/top1": final - 5}), timed({"test/net/top1": final})]
    return fake_run(folder, "cifar100/baseline_resnet32", [f"recipe={recipe}", f"seed={seed}"], rows, world_size)


def test_the_table_on_hand_made_runs(tmp_path):
    runs = tmp_path / "runs"
    _baseline(runs / "b1", 1, 60.0)
    _baseline(runs / "b2", 2, 62.0, world_size=2)
    _dml(runs / "d1", 1, (50.0, 64.0), {"test/net1/top1": 66.0})
    _dml(runs / "d2", 2, (70.0, 66.0), {"test/net1/top1": 65.0})
    comparison = build_comparison([runs])
    assert not comparison.mixed and list(comparison.recipes) == ["ffsd"]
    base, dml = comparison.rows
    assert (base.method, dml.method) == ("baseline", "dml") and dml.seeds == [1, 2]
    assert dml.deploy_head == "net0"
    assert dml.stats["final/top1"] == pytest.approx((65.0, 1.0))  # 64 and 66: mean, population std
    assert dml.stats["best/top1"] == pytest.approx((67.0, 3.0))  # max over epochs of net0: 64 and 70
    assert dml.stats["paper/top1"] == pytest.approx((68.0, 2.0))  # max over heads but the oracle: 66 and 70
    assert dml.paper_heads == ["net1", "net0"]
    assert dml.gain == pytest.approx(65.0 - 61.0) and base.gain is None
    assert dml.images_per_s == pytest.approx(150.0)  # mean over epochs (200, 100), then runs
    assert dml.hours == pytest.approx((18 + 36 + 4) / 3600)
    assert base.hours == pytest.approx(((36 + 36) + 2 * (36 + 36)) / 2 / 3600)  # x2 processes for b2
    assert base.devices == ["2 x cpu", "cpu"]
    md = to_markdown(comparison)
    assert md.startswith("# okd compare\n") and "MIXED" not in md
    assert "- ffsd: changed: data.limit_train" not in md and "- ffsd: changed: train.epochs=2 (recipe: 299)" in md
    row = "| dml | resnet32 | ffsd | 2 (1, 2) | 65.00 ± 1.00 (net0) | +4.00 | 67.00 ± 3.00 | 68.00 ± 2.00 (net1, net0) "
    assert row in md
    assert "| baseline | resnet32 | ffsd | 2 (1, 2) | 61.00 ± 1.00 (net) | (baseline) |" in md
    table = list(csv.DictReader(io.StringIO(to_csv(comparison))))
    assert [r["method"] for r in table] == ["baseline", "dml"]
    assert float(table[1]["gain_over_baseline"]) == pytest.approx(4.0) and table[1]["mixed"] == "0"
    assert table[1]["paper_heads"] == "net1 net0" and float(table[1]["images_per_s"]) == pytest.approx(150.0)


def test_paper_metric_skips_oracles_and_averages(tmp_path):
    run = read_run(_dml(tmp_path / "d", 1, (50.0, 64.0), {"test/net1/top1": 66.0}))
    assert paper_metric(run) == (66.0, "net1")  # not the oracle's 99, not avg(net*)


def test_a_missing_baseline_is_said(tmp_path):
    _dml(tmp_path / "runs" / "d1", 1, (50.0, 64.0), {"test/net1/top1": 66.0})
    comparison = build_comparison([tmp_path / "runs"])
    assert comparison.rows[0].gain is None
    (note,) = comparison.notes
    assert note.startswith("no baseline of resnet32 under ffsd among these runs, so no gain for dml")
    assert "okd train cifar100/baseline_resnet32 recipe=ffsd" in note


def test_mixed_recipes_are_refused_or_marked(tmp_path):
    runs = tmp_path / "runs"
    _baseline(runs / "b1", 1, 60.0)
    _dml(runs / "d1", 1, (50.0, 64.0), {"test/net1/top1": 66.0}, recipe="okddip")
    with pytest.raises(ConfigError) as info:
        build_comparison([runs])
    msg = str(info.value)
    assert msg.startswith("these runs were trained under 2 recipes (ffsd: ") and "okddip: " in msg
    assert "data.padding_mode (reflect vs zeros)" in msg and "optim.weight_decay (0.0001 vs 0.0005)" in msg
    assert "--allow-mixed-recipes" in msg
    comparison = build_comparison([runs], allow_mixed=True)
    assert comparison.mixed and [r.recipe for r in comparison.rows] == ["ffsd", "okddip"]
    md = to_markdown(comparison)
    assert md.startswith("# okd compare — MIXED RECIPES") and "**Mixed recipes:** these rows were trained under 2" in md
    assert "| dml | resnet32 | okddip |" in md and comparison.rows[1].gain is None  # no baseline of its recipe
    assert {r["mixed"] for r in csv.DictReader(io.StringIO(to_csv(comparison)))} == {"1"}


def test_one_recipe_with_changed_settings_is_mixed_too(tmp_path):
    runs = tmp_path / "runs"
    _baseline(runs / "b1", 1, 60.0)
    rows = [timed({"test/net/top1": 50.0}), timed({"test/net/top1": 61.0})]
    fake_run(runs / "b2", "cifar100/baseline_resnet32", ["recipe=ffsd", "optim.weight_decay=5e-4"], rows)
    differ = r"2 recipes \(ffsd#1: .*; ffsd#2: .*optim\.weight_decay \(0\.0001 vs 0\.0005\)"
    with pytest.raises(ConfigError, match=differ):
        build_comparison([runs])
    comparison = build_comparison([runs], allow_mixed=True)
    assert sorted(comparison.recipes) == ["ffsd#1", "ffsd#2"]
    assert "optim.weight_decay=0.0005 (recipe: 0.0001)" in comparison.recipes["ffsd#2"]


def test_one_recipe_on_two_datasets_is_one_recipe(tmp_path):
    """PCL's recipe normalises CIFAR-100 its own way and CIFAR-10 the standard way: still the one recipe."""
    rows = [timed({"test/net/top1": 50.0})]
    fake_run(tmp_path / "runs" / "c10", "cifar10/baseline_resnet32", ["recipe=pcl"], rows)
    fake_run(tmp_path / "runs" / "c100", "cifar100/baseline_resnet32", ["recipe=pcl"], rows)
    comparison = build_comparison([tmp_path / "runs"])
    assert not comparison.mixed and [(r.dataset, r.recipe) for r in comparison.rows] == [
        ("cifar10", "pcl"),
        ("cifar100", "pcl"),
    ]
    assert "## cifar10\n" in to_markdown(comparison) and "## cifar100\n" in to_markdown(comparison)


def test_the_compare_command_writes_its_files(tmp_path):
    runs = tmp_path / "runs"
    _baseline(runs / "b1", 1, 60.0)
    md, table = tmp_path / "c.md", tmp_path / "c.csv"
    text = helpers.cli("compare", runs, "--markdown", md, "--csv", table)
    assert md.read_text() in text and f"Markdown written to {md}" in text
    assert next(csv.DictReader(table.open()))["method"] == "baseline"


# ------------------------------------------------------------------------------------------ small real runs
@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory, cifar10_root) -> dict[str, list[Path]]:
    """baseline and DML (ResNet-20) under the FFSD recipe, two seeds each, and DML under its own recipe."""
    out = tmp_path_factory.mktemp("compare")
    quick = [
        f"data.root={cifar10_root}",
        "data.download=false",
        "data.limit_train=64",
        "data.limit_test=64",
        "data.batch_size=16",
        "data.test_batch_size=64",
        "train.epochs=2",
        "train.max_steps_per_epoch=1",
        "train.progress=none",
        "train.device=cpu",
        "model.name=resnet20",
        f"output_dir={out}",
    ]
    configs = ["cifar10/baseline_resnet32", "cifar10/dml_resnet32"]
    same = run_sweep(configs, [0, 1], [*quick, "recipe=ffsd"])
    own = run_sweep(["cifar10/dml_resnet32"], [0], quick)
    return {"ffsd": same, "okddip": own}


@pytest.mark.slow
def test_compare_on_small_real_runs(recipe_runs):
    names = [p.name for p in recipe_runs["ffsd"]]
    assert names == [
        "cifar10_baseline_resnet20_ffsd_s0",
        "cifar10_baseline_resnet20_ffsd_s1",
        "cifar10_dml_resnet20_ffsd_s0",
        "cifar10_dml_resnet20_ffsd_s1",
    ]
    text = helpers.cli("compare", *recipe_runs["ffsd"])
    assert text.startswith("# okd compare\n") and "- ffsd: changed: data.batch_size=16 (recipe: 128)" in text
    finals = {}
    for method in ("baseline", "dml"):
        head = "net" if method == "baseline" else "net0"
        values = [read_metrics_csv(p / "metrics.csv")[-1][f"test/{head}/top1"] for p in recipe_runs["ffsd"]
                  if f"_{method}_" in p.name]  # fmt: skip
        finals[method] = statistics.fmean(values)
        cell = f"{finals[method]:.2f} ± {statistics.pstdev(values):.2f} ({head})"
        assert f"| {method} | resnet20 | ffsd | 2 (0, 1) | {cell} |" in text
    assert f"| {finals['dml'] - finals['baseline']:+.2f} |" in text
    row = next(line for line in text.splitlines() if line.startswith("| dml |"))
    assert row.endswith("| cpu |") and float(row.split("|")[9].replace(",", "")) > 0  # images/s of the runs


@pytest.mark.slow
def test_compare_refuses_then_marks_the_real_mixed_runs(recipe_runs):
    runs = [*recipe_runs["ffsd"], *recipe_runs["okddip"]]
    assert [p.name for p in recipe_runs["okddip"]] == ["cifar10_dml_resnet20_s0"]
    with pytest.raises(ConfigError, match="trained under 2 recipes"):
        build_comparison(runs)
    text = helpers.cli("compare", *runs, "--allow-mixed-recipes")
    assert text.startswith("# okd compare — MIXED RECIPES") and "| dml | resnet20 | okddip | 1 (0) |" in text
    report = helpers.cli("report", *runs)
    assert "**Mixed recipes:** these runs were trained under 2 recipes (ffsd: 4 run(s); okddip: 1 run(s))." in report


def test_runs_scored_every_few_epochs_are_said(tmp_path):
    """train.eval_every: an unscored epoch (no test column) is neither final nor best, and the notes say which
    epochs were scored."""
    rows = [timed({"test/net/top1": 70.0}), timed({}), timed({"test/net/top1": 60.0})]
    fake_run(tmp_path / "runs" / "b1", "cifar100/baseline_resnet32", ["recipe=ffsd", "seed=1"], rows)
    comparison = build_comparison([tmp_path / "runs"])
    (base,) = comparison.rows
    assert base.stats["final/top1"] == pytest.approx((60.0, 0.0)) and base.stats["best/top1"][0] == 70.0
    assert "b1 scored only at epochs 1, 3 of 3 (train.eval_every)" in comparison.notes
