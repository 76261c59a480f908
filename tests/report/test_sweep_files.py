"""okd sweep with a recipe and with sweep files, and the planned CIFAR-100 table under the FFSD recipe."""

from __future__ import annotations

import helpers
import pytest

from okd.cli import main
from okd.errors import ConfigError
from okd.methods import METHODS
from okd.report.sweep import SweepEntry, sweep_plan, with_recipe
from okd.report.sweep_file import load_sweep_file

PLAN = helpers.REPO / "benchmarks" / "sweeps" / "cifar100_ffsd_recipe.yaml"
BACKBONES = ("resnet32", "wrn16_2")


@pytest.mark.slow
def test_the_planned_table_covers_every_method_on_both_backbones():
    plan = load_sweep_file(PLAN)
    assert plan.recipe == "ffsd" and plan.seeds == [0, 1, 2]
    resolved = sweep_plan(plan.runs, plan.seeds, with_recipe(plan.overrides, plan.recipe))
    assert len(resolved) == len(plan.runs) * 3 == 81
    covered = {(cfg.method_name, cfg.run.model.name) for *_, cfg in resolved}
    left_out = {(item["method"], model) for item in plan.left_out for model in BACKBONES if model in item["model"]}
    assert covered | left_out == {(m, b) for m in METHODS.names() for b in BACKBONES}
    assert not covered & left_out and all(item["reason"] for item in plan.left_out)
    for *_, cfg in resolved:  # every run under the FFSD recipe, with its own method's parameters
        assert cfg.run.recipe == "ffsd" and cfg.run.train.epochs == 299 and cfg.run.optim.weight_decay == 1e-4
        assert cfg.run.data.padding_mode == "reflect" and cfg.run.output_dir == "runs/cifar100_ffsd_recipe"
    kdcl = [cfg for *_, cfg in resolved if cfg.method_name == "kdcl"]
    assert {tuple(c.method_params.models) for c in kdcl} == {()} and kdcl[0].method_params.student_count() == 2
    assert "\nexpected_time: " in PLAN.read_text()  # how long it takes, measured how


@pytest.mark.slow
def test_sweep_file_prints_its_commands_and_what_it_leaves_out():
    text = helpers.cli("sweep", "--file", PLAN, "--print")
    commands = [line for line in text.splitlines() if line.startswith("okd train ")]
    assert len(commands) == 81 and all("recipe=ffsd" in c for c in commands)
    assert "okd train cifar100/pcl_resnet32 model.name=wrn16_2 output_dir=runs/cifar100_ffsd_recipe recipe=ffsd " \
           "seed=2 name=cifar100_pcl_wrn16_2_ffsd_s2" in commands  # fmt: skip
    assert "# left out: method=kd, model=resnet32 and wrn16_2, reason=not an online method" in text
    # the command line replaces the file's seeds and recipe, and adds overrides after the file's
    text = helpers.cli("sweep", "--file", PLAN, "--seeds", "5", "--recipe", "okddip", "train.epochs=3", "--print")
    first = text.splitlines()[0]
    assert first == (
        "okd train cifar100/baseline_resnet32 output_dir=runs/cifar100_ffsd_recipe train.epochs=3 recipe=okddip "
        "seed=5 name=cifar100_baseline_resnet32_okddip_s5"
    )


def test_sweep_takes_a_recipe_for_several_configs():
    text = helpers.cli("sweep", "cifar10/baseline_resnet20", "cifar10/dml_resnet32", "--seeds", "1", "--recipe", "pcl",
                       "--print")  # fmt: skip
    assert text.splitlines() == [
        "okd train cifar10/baseline_resnet20 recipe=pcl seed=1 name=cifar10_baseline_resnet20_pcl_s1",
        "okd train cifar10/dml_resnet32 recipe=pcl seed=1 name=cifar10_dml_resnet32_pcl_s1",
    ]
    assert with_recipe(["recipe=ffsd", "seed=1"], "ffsd") == ["seed=1", "recipe=ffsd"]
    assert with_recipe(["seed=1"], None) == ["seed=1"]
    with pytest.raises(ConfigError, match="--recipe okddip and the override recipe=ffsd disagree"):
        with_recipe(["recipe=ffsd"], "okddip")


def test_sweep_entries_with_overrides_of_their_own():
    plan = sweep_plan([SweepEntry("cifar10/one_resnet32", ("model.name=wrn16_2",)), "cifar10/one_resnet32"], [3])
    assert [(c, items[-1]) for c, _, items, _ in plan] == [
        ("cifar10/one_resnet32", "name=cifar10_one_wrn16_2_s3"),
        ("cifar10/one_resnet32", "name=cifar10_one_resnet32_s3"),
    ]
    with pytest.raises(ConfigError, match="a sweep entry sets neither seed nor name"):
        sweep_plan([SweepEntry("cifar10/one_resnet32", ("seed=4",))], [3])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "must hold a mapping"),
        ("runs: [cifar10/dml_resnet32]\nsedes: [1]", "unknown key(s) sedes"),
        ("seeds: [1]", "needs runs: a non-empty list of configs"),
        ("runs: [cifar10/dml_resnet32]\nseeds: [one]", "seeds must be a list of integers"),
        ("runs: [{conf: cifar10/dml_resnet32}]", "runs[0] must be a config name or {config: NAME"),
        ("runs: [{config: x, overrides: [seed]}]", "runs[0].overrides must be a list of key=value strings"),
        ("runs: [x]\nrecipe: [ffsd]", "recipe must be a recipe name"),
        ("runs: [x]\nleft_out: [{method: kd}]", "left_out must be a list of mappings, each with a reason"),
        ("runs: [x\n", "is not valid YAML"),
    ],
)
def test_bad_sweep_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_sweep_file(path)
    assert message in str(info.value)


def test_sweep_needs_configs_from_one_place(tmp_path, capsys):
    assert main(["sweep", "--seeds", "1", "--print"]) == 2
    assert helpers.mentions(capsys.readouterr().err, "okd sweep needs configs")
    assert main(["sweep", "cifar10/dml_resnet32", "--file", str(PLAN), "--print"]) == 2
    assert helpers.mentions(capsys.readouterr().err, "give the configs in the sweep file or on the command line")
    assert main(["sweep", "--file", str(tmp_path / "none.yaml"), "--print"]) == 2
    assert helpers.mentions(capsys.readouterr().err, "does not exist")
