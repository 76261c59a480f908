"""Recipes: named bases of the run sections that any method runs under (okd/configs/recipes, docs/recipes.md).

A packaged config is its model, method and recipe name; ``recipe=NAME`` runs it under another recipe, which
then gives every data, optim and train setting while the method keeps its own parameters. Merge order: typed
defaults < recipe < the config file's own keys < overrides.
"""

from __future__ import annotations

import dataclasses

import helpers
import pytest
import yaml

import okd.config
from okd.cli import main
from okd.config import (
    EXECUTION_KEYS,
    compose,
    flatten,
    recipe_body,
    recipe_deviations,
    recipe_run,
    recipe_summary,
)
from okd.configs import (
    PACKAGED,
    packaged_configs,
    packaged_recipe,
    recipe_datasets,
    recipe_file,
    recipe_names,
    resolve_config,
)
from okd.engine.trainer import default_run_name, run_stem
from okd.errors import ConfigError
from okd.methods.build import load_config
from okd.runs.resume_policy import check_changes

SECTIONS = ("data", "optim", "train")
#: what a packaged config may hold beside its model and method: the recipe, the dataset and where it lives
CONFIG_KEYS = {"recipe", "data.dataset", "data.root"}


def settings(cfg) -> dict:
    """The recipe side of a resolved config: its data, optim and train sections and its seed."""
    return {"seed": cfg.run.seed, **{s: dataclasses.asdict(getattr(cfg.run, s)) for s in SECTIONS}}


def method_params(cfg) -> dict:
    return dataclasses.asdict(cfg.method_params)


# ------------------------------------------------------------------------------------------- the packaged files
PACKAGED_RECIPE_CONFIGS = [n for n in packaged_configs() if not n.startswith("examples/")]


@pytest.mark.parametrize("name", PACKAGED_RECIPE_CONFIGS)
def test_a_packaged_config_is_model_method_and_recipe(name):
    raw = yaml.safe_load(resolve_config(name).read_text(encoding="utf-8"))
    dataset = raw["data"]["dataset"]
    assert raw["recipe"] in recipe_names(dataset), name
    held = {k for k in flatten(raw) if not k.startswith(("model.", "method."))}
    assert held <= CONFIG_KEYS, f"{name} holds recipe settings {sorted(held - CONFIG_KEYS)}: they belong in the recipe"
    assert load_config(name).run.recipe == raw["recipe"]


def test_the_examples_are_custom_configs_for_your_own_data():
    """examples/ are templates for a folder dataset (no recipes exist for one): they carry their settings."""
    for name in (n for n in packaged_configs() if n.startswith("examples/")):
        assert load_config(name).run.recipe is None


@pytest.mark.parametrize("dataset", recipe_datasets())
def test_every_recipe_file_is_valid_and_described(dataset):
    for name in recipe_names(dataset):
        raw = yaml.safe_load(recipe_file(dataset, name).read_text(encoding="utf-8"))
        assert isinstance(raw.pop("description"), str), name
        assert set(raw) <= {"data", "optim", "train", "seed"}, name
        assert not set(flatten(raw)) & EXECUTION_KEYS, name
        run = recipe_run(dataset, name)
        assert run.recipe == name and run.data.dataset == dataset
        okd.config.validate_run(run)


def test_recipes_are_not_configs():
    assert not any(n.startswith("recipes/") for n in packaged_configs())
    assert resolve_config("recipes/cifar100/ffsd") is None and resolve_config("configs/recipes/cifar100/ffsd") is None
    with pytest.raises(ConfigError, match="no packaged config has that name"):
        load_config("recipes/cifar100/ffsd")


def test_packaged_recipe_is_the_recipe_of_the_methods_own_config():
    assert packaged_recipe("cifar100", "dml", "resnet32") == "okddip"
    assert packaged_recipe("cifar100", "ffsd", "resnet32") == "ffsd"
    assert packaged_recipe("cifar100", "baseline", "resnet32") == "ffsd_paper"
    assert packaged_recipe("cifar100", "cmff", "cmff_vgg16") == "cmff_vgg"
    assert packaged_recipe("cifar100", "pcl", "wrn16_2") == "pcl"  # no such config: the method's usual recipe
    assert packaged_recipe("cifar100", "no_such_method", "resnet32") is None
    assert packaged_recipe("folder", "dml", "x") is None


# ---------------------------------------------------------------------------------- a method under any recipe
@pytest.mark.parametrize(
    ("config", "recipe", "home"),
    [
        ("cifar100/dml_resnet32", "ffsd", "cifar100/ffsd_resnet32"),
        ("cifar100/ffsd_resnet32", "okddip", "cifar100/okddip_resnet32"),
        ("cifar100/okddip_wrn16_2", "kdcl", "cifar100/kdcl_resnet32_wrn16_2"),
        ("cifar100/baseline_resnet32", "pcl", "cifar100/pcl_resnet32"),
        ("cifar10/one_resnet32", "ffl", "cifar10/ffl_resnet32"),
        ("cifar100/ffl_resnet32", "cmff", "cifar100/cmff_resnet32"),
    ],
)
def test_a_method_under_another_recipe_gets_its_settings_and_keeps_its_parameters(config, recipe, home):
    moved = load_config(config, [f"recipe={recipe}"])
    assert moved.run.recipe == recipe
    assert settings(moved) == settings(load_config(home))  # the recipe's run, as the recipe's own method has it
    own = load_config(config)
    assert moved.method_name == own.method_name and method_params(moved) == method_params(own)
    assert moved.run.model == own.run.model


def test_the_recipe_is_looked_up_for_the_runs_dataset():
    c100 = load_config("cifar100/dml_resnet32", ["recipe=pcl"]).run
    c10 = load_config("cifar10/dml_resnet32", ["recipe=pcl"]).run
    assert c100.data.mean == [0.5071, 0.4866, 0.4409] and c10.data.mean is None  # PCL's statistics: CIFAR-100 only
    moved = load_config("cifar10/dml_resnet32", ["recipe=pcl", "data.dataset=cifar100"]).run
    assert moved.data.mean == c100.data.mean and moved.seed == 42


def test_merge_order_defaults_recipe_file_overrides(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("recipe: ffsd\ndata: {dataset: cifar100}\nmodel: {name: resnet32}\nmethod: {name: dml}\n"
                    "optim: {lr: 0.05}\n")  # fmt: skip
    cfg = load_config(user, ["train.epochs=7"]).run
    ffsd = recipe_run("cifar100", "ffsd")
    assert cfg.optim.lr == 0.05  # the file's own key over the recipe's
    assert cfg.train.epochs == 7  # the override over both
    assert cfg.optim.weight_decay == ffsd.optim.weight_decay == 1e-4 and cfg.data.padding_mode == "reflect"
    assert cfg.train.precision == "fp32" and cfg.data.holdout == 0  # typed defaults where the recipe is silent
    # recipe= on the command line replaces the file's recipe; the file's own key still wins over it
    other = load_config(user, ["recipe=okddip"]).run
    assert other.recipe == "okddip" and other.data.padding_mode == "zeros" and other.optim.lr == 0.05


def test_a_config_without_a_recipe_is_custom(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("data: {dataset: cifar10, padding_mode: zeros}\nmethod: {name: dml}\noptim: {lr: 0.02}\n")
    cfg = load_config(user)
    assert cfg.run.recipe is None and cfg.to_dict()["recipe"] is None
    assert cfg.run.optim.lr == 0.02 and cfg.run.optim.weight_decay == okd.config.OptimConfig.weight_decay
    assert recipe_deviations(cfg.run) == {}
    assert recipe_summary(cfg.run).startswith("recipe custom: the run names no recipe")
    raw = compose(okd.config.load_raw(user), okd.config.parse_overrides(["seed=4"]))
    assert "recipe" not in raw and raw.seed == 4  # nothing merged in


def test_unknown_recipes_say_what_exists():
    with pytest.raises(ConfigError) as info:
        load_config("cifar100/dml_resnet32", ["recipe=fsd"])
    msg = str(info.value)
    assert "unknown recipe 'fsd' for cifar100; did you mean ffsd?" in msg
    assert "cmff, cmff_vgg, ffl, ffsd, ffsd_paper, kdcl, mcl, okddip, okdph, pcl" in msg and "okd recipes" in msg
    with pytest.raises(ConfigError, match="okd ships no recipes for data.dataset=folder"):
        load_config("cifar100/dml_resnet32", ["recipe=ffsd", "data.dataset=folder"])
    with pytest.raises(ConfigError, match="must be a recipe name"):
        load_config("cifar100/dml_resnet32", ["recipe=3"])
    with pytest.raises(ConfigError, match="unknown recipe 'cifar100/ffsd'"):
        load_config("cifar100/dml_resnet32", ["recipe=cifar100/ffsd"])


def test_a_recipe_holds_only_recipe_settings(monkeypatch):
    bodies = {
        "where": {"data": {"root": "/elsewhere"}},
        "extra": {"model": {"name": "resnet20"}},
        "unknown": {"optim": {"lrr": 0.1}},
    }
    monkeypatch.setattr(okd.config, "read_recipe", lambda dataset, name: bodies[name])
    with pytest.raises(ConfigError, match=r"sets data\.root: where a run executes is no part of a recipe"):
        recipe_body("cifar100", "where")
    with pytest.raises(ConfigError, match="may hold only the sections data, optim, train and a seed"):
        recipe_body("cifar100", "extra")
    with pytest.raises(ConfigError, match=r"recipe cifar100/unknown: unknown config key optim\.lrr"):
        recipe_body("cifar100", "unknown")


# ------------------------------------------------------------------------------ what a run says of its recipe
def test_deviations_name_every_recipe_setting_a_run_changed():
    assert recipe_deviations(load_config("cifar100/dml_resnet32").run) == {}
    run = load_config(
        "cifar100/dml_resnet32",
        ["recipe=ffsd", "optim.weight_decay=5e-4", "data.limit_train=64", "data.root=/x", "train.device=cpu", "seed=3"],
    ).run
    assert recipe_deviations(run) == {"data.limit_train": (None, 64), "optim.weight_decay": (1e-4, 5e-4)}
    text = recipe_summary(run)
    assert text.startswith("recipe ffsd (cifar100; docs/recipes.md), changed by this run: ")
    assert "data.limit_train=64 (recipe: null)" in text and "optim.weight_decay=0.0005 (recipe: 0.0001)" in text
    assert recipe_summary(load_config("cifar100/ffsd_resnet32").run).endswith(", as the recipe gives it")
    other_version = dataclasses.replace(run, recipe="not_shipped")  # a saved run of a recipe this okd lacks
    assert recipe_summary(other_version) == (
        "recipe not_shipped: not shipped with this okd, so what the run changed in it is unknown"
    )


def test_a_run_under_another_recipe_is_named_after_it():
    own = load_config("cifar100/dml_resnet32", ["seed=2"])
    assert default_run_name(own) == "cifar100_dml_resnet32_s2"
    assert run_stem(load_config("cifar100/dml_resnet32", ["recipe=ffsd"])) == "cifar100_dml_resnet32_ffsd"
    assert run_stem(load_config("cifar100/ffsd_resnet32", ["recipe=ffsd"])) == "cifar100_ffsd_resnet32"
    assert run_stem(load_config("cifar100/pcl_resnet32", ["model.name=wrn16_2"])) == "cifar100_pcl_wrn16_2"
    assert default_run_name(load_config("cifar100/dml_resnet32", ["recipe=ffsd", "name=mine"])) == "mine"


def test_the_recipe_cannot_change_on_resume():
    saved = load_config("cifar100/dml_resnet32").to_dict()
    asked = load_config("cifar100/dml_resnet32", ["recipe=ffsd"]).to_dict()
    with pytest.raises(ConfigError) as info:
        check_changes(saved, asked, 3)
    msg = str(info.value)
    assert msg.startswith("cannot change data.padding_mode, optim.weight_decay, recipe on resume")
    assert "recipe='okddip' (asked 'ffsd')" in msg
    relabelled = {**saved, "recipe": "ffsd"}  # the name alone is the recipe too
    with pytest.raises(ConfigError, match=r"cannot change recipe on resume"):
        check_changes(saved, relabelled, 3)


# ----------------------------------------------------------------------------------------------- the commands
def test_okd_recipes_lists_and_shows_them(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for dataset in recipe_datasets():
        for name in recipe_names(dataset):
            assert f"{dataset}/{name} " in out
    assert "cifar100/okddip" in out and "the OKDDip repository" in out
    assert main(["recipes", "cifar10"]) == 0
    assert "cifar100/" not in capsys.readouterr().out
    assert main(["recipes", "cifar100/ffsd"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith("# cifar100/ffsd: FFSD's official CIFAR code")
    assert {"train.epochs=299", "optim.weight_decay=0.0001", "data.padding_mode=reflect", "data.mean=null"} <= set(
        shown
    )
    assert not any(line.startswith(("data.root", "train.device")) for line in shown)
    assert main(["recipes", "svhn"]) == 2
    assert helpers.mentions(capsys.readouterr().err, "okd ships no recipes for 'svhn'")
    assert main(["recipes", "cifar100/nope"]) == 2
    assert helpers.mentions(capsys.readouterr().err, "unknown recipe 'nope' for cifar100")


def test_okd_config_shows_the_recipe(capsys):
    assert main(["config", "cifar100/dml_resnet32", "recipe=ffsd"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["recipe"] == "ffsd" and printed["train"]["epochs"] == 299 and printed["method"]["name"] == "dml"


def test_the_checkout_configs_link_shows_the_recipes():
    assert (PACKAGED / "recipes" / "cifar100" / "ffsd.yaml").is_file()
    assert (helpers.REPO / "configs" / "recipes" / "cifar100" / "ffsd.yaml").is_file()


def test_a_file_recipe_carried_to_another_data_set_keeps_its_settings_and_is_custom():
    """`data.dataset=tinyimagenet` on a CIFAR-100 config whose recipe tinyimagenet lacks: the recipe's CIFAR-100
    settings still apply (as before recipes existed), and the run names no recipe; naming the recipe on the command
    line asks for tinyimagenet's own, which is refused with the known ones."""
    own = load_config("cifar100/dml_resnet32").to_dict()
    moved = load_config("cifar100/dml_resnet32", ["data.dataset=tinyimagenet", "model.name=resnet18"]).to_dict()
    assert moved["recipe"] is None and moved["data"]["dataset"] == "tinyimagenet"
    assert moved["optim"] == own["optim"] and moved["train"] == own["train"]
    assert moved["data"]["padding_mode"] == own["data"]["padding_mode"]
    with pytest.raises(ConfigError, match="unknown recipe 'okddip' for tinyimagenet"):
        load_config("cifar100/dml_resnet32", ["data.dataset=tinyimagenet", "recipe=okddip"])
