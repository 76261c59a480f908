"""okd report and the recipes: each group names its recipe, a report over several recipes is marked, and a run
is compared with the published figures of its own recipe (or of an unstated one, marked) only."""

from __future__ import annotations

import csv
import io

import pytest
import torch
import yaml
from recipe_fixtures import fake_run

from okd.configs import recipe_names
from okd.report.comparability import recipe_epochs
from okd.report.published import DATASET_KEYS, find_published, load_published
from okd.report.tables import build_report, to_csv, to_markdown

LEADER = [{"test/leader/top1": 74.0, "test/student0/top1": 72.0, "test/student1/top1": 71.0}]
NET = [{"test/net/top1": 69.0}]


def test_every_published_recipe_is_a_recipe_of_its_dataset():
    stated = [r for r in load_published() if r.recipes]
    assert {r.recipe for r in stated} == {"ffsd|ffsd_paper", "ffsd", "pcl", "switokd", "switokd_multi", "mcl"}
    for r in stated:
        assert set(r.recipes) <= set(recipe_names(DATASET_KEYS[r.dataset])), r
    # FFSD's own rows are FFSD's recipe; figures a source quotes leave it unstated
    assert all(r.recipes for r in load_published() if r.source == "FFSD paper" and r.okd_method == "ffsd")
    assert not any(r.recipes for r in load_published() if r.okd_method in ("dml", "one", "okddip", "kdcl", "kd"))


def test_a_run_is_compared_with_its_own_recipes_figures_only():
    ffsd = [r.value for r in find_published("baseline", "resnet32", "cifar100", recipe="ffsd")]
    okddip = find_published("baseline", "resnet32", "cifar100", recipe="okddip")
    assert ffsd[0] == "69.96"  # FFSD paper Table I, the FFSD recipe's baseline, first
    assert [r.where for r in okddip] == ["CMFF README", "CMFF README"]  # unstated; FFSD's baseline never
    assert all(not r.recipes for r in okddip)
    assert len(find_published("baseline", "resnet32", "cifar100")) == 4  # a run without a recipe sees every row
    assert [r.head for r in find_published("pcl", "resnet32", "cifar100", recipe="pcl")][0] == "ema_best_of_3"
    assert not [r for r in find_published("pcl", "resnet32", "cifar100", recipe="ffsd") if r.recipes]


def test_report_names_the_recipe_and_filters_published_rows(tmp_path):
    own = fake_run(tmp_path / "own", "cifar100/baseline_resnet32", ["recipe=ffsd"], NET)
    (g,) = build_report([own])
    assert g.recipe == "ffsd" and g.rows[0].published.where == "FFSD paper, Table I"
    md = to_markdown([g])
    assert "Recipe: ffsd (every run; docs/recipes.md)." in md and "## cifar100 · resnet32 · baseline · ffsd" in md
    assert "1 run(s), seeds 0; 1 epochs. Recipe: ffsd." in md
    assert "70.02 (CMFF README [recipe unstated])" in md and "Mixed recipes" not in md
    other = fake_run(tmp_path / "other", "cifar100/baseline_resnet32", ["recipe=okddip"], NET)
    (g,) = build_report([other])
    assert g.rows[0].published.value == "70.02" and "69.96" not in to_markdown([g])


def test_a_report_over_several_recipes_is_marked(tmp_path):
    fake_run(tmp_path / "runs" / "a", "cifar100/dml_resnet32", ["recipe=ffsd"], [{"test/net0/top1": 70}])
    fake_run(tmp_path / "runs" / "b", "cifar100/dml_resnet32", [], [{"test/net0/top1": 71}])
    fake_run(tmp_path / "runs" / "c", "cifar100/dml_resnet32", [], [{"test/net0/top1": 73}], device=None)
    groups = build_report([tmp_path / "runs"])
    assert [(g.recipe, len(g.runs)) for g in groups] == [("ffsd", 1), ("okddip", 2)]  # runs pooled per recipe
    md = to_markdown(groups)
    assert "**Mixed recipes:** these runs were trained under 2 recipes (ffsd: 1 run(s); okddip: 2 run(s))." in md
    assert "`okd compare`" in md
    table = list(csv.DictReader(io.StringIO(to_csv(groups))))
    assert {(r["recipe"], r["n_runs"]) for r in table if r["head"] == "net0"} == {("ffsd", "1"), ("okddip", "2")}


def test_runs_without_a_recipe_read_as_custom(tmp_path):
    run = fake_run(tmp_path / "old", "cifar100/ffsd_resnet32", [], LEADER)
    cfg_path = run / "config.yaml"
    last = torch.load(run / "last.pt", weights_only=False)
    del last["config"]["recipe"]  # a run written before recipes existed
    torch.save(last, run / "last.pt")
    cfg = yaml.safe_load(cfg_path.read_text())
    del cfg["recipe"]
    cfg_path.write_text(yaml.safe_dump(cfg))
    (g,) = build_report([run])
    assert g.recipe is None and g.rows[0].published.value == "74.85"
    md = to_markdown([g])
    assert "Recipe: custom (every run" in md and "Recipe: custom (none named: published figures of every recipe)" in md
    assert "[recipe unstated]" not in md
    assert "1 epoch(s) trained; the recipe (cifar100/ffsd_resnet32) trains 299" in g.caveats


def test_the_epoch_caveat_follows_the_runs_recipe(tmp_path):
    run = fake_run(tmp_path / "r", "cifar100/ffsd_resnet32", ["recipe=ffsd_paper"], LEADER)
    (g,) = build_report([run])
    assert "1 epoch(s) trained; the recipe (ffsd_paper) trains 300" in g.caveats
    assert recipe_epochs("cifar100", "dml", "resnet32", "kdcl") == ("kdcl", 240)
    assert recipe_epochs("cifar100", "dml", "resnet32", "not_shipped") is None
    assert recipe_epochs("cifar100", "dml", "resnet32") == ("cifar100/dml_resnet32", 300)


@pytest.mark.parametrize("recipe", ["ffsd", "ffsd_paper"])
def test_both_readings_of_ffsds_recipe_meet_its_published_rows(recipe, tmp_path):
    run = fake_run(tmp_path / recipe, "cifar100/ffsd_resnet32", [f"recipe={recipe}"], LEADER)
    (g,) = build_report([run])
    lead = next(r for r in g.rows if r.head == "leader")
    assert (lead.published.value, lead.published.table) == ("74.85", "Table I")
