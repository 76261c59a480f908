"""``okd config --explain``: the reference of every config key and method parameter, and docs/config-reference.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import helpers
import pytest

from okd.cli import main
from okd.config import RunConfig, flatten
from okd.errors import ConfigError
from okd.methods import METHODS
from okd.report import config_reference as ref

PAGE = Path(__file__).resolve().parents[2] / "docs" / "config-reference.md"


def test_the_docs_page_is_current():
    """docs/config-reference.md is exactly what the code generates (CI runs this test)."""
    assert PAGE.read_text(encoding="utf-8") == ref.markdown(), (
        "docs/config-reference.md is stale: regenerate it with `okd config --explain --markdown > "
        "docs/config-reference.md`"
    )


def test_every_run_key_and_method_parameter_is_explained(capsys):
    run_keys = set(flatten(dataclasses.asdict(RunConfig())))
    run_keys |= {"model.kwargs"}  # an empty mapping flattens to nothing
    assert {i.key for i in ref.run_keys()} == run_keys
    for name in METHODS.names():
        params = {f"method.{f.name}" for f in dataclasses.fields(METHODS.get(name).Params)}
        assert {i.key for i in ref.method_keys(name)} == params, name
    for key in ("train.epochs", "data.root", "optim.milestones", "seed", "model.members"):
        assert main(["config", "--explain", key]) == 0
        assert capsys.readouterr().out.startswith(f"{key}: "), key
    assert main(["config", "--explain"]) == 0
    everything = capsys.readouterr().out
    for info in ref.run_keys():
        assert f"\n{info.key}: {info.type} = " in everything, info.key


def test_types_defaults_ranges_and_resume_come_from_the_code():
    keys = {i.key: i for i in ref.run_keys()}
    assert (keys["train.epochs"].type, keys["train.epochs"].default, keys["train.epochs"].accepts) == (
        "int",
        300,
        ">= 1",
    )
    assert keys["optim.momentum"].accepts == "[0, 1)" and keys["optim.lr"].accepts == "> 0"
    assert keys["optim.weight_decay"].accepts == ">= 0"
    assert keys["data.dataset"].accepts == "one of cifar10, cifar100, imagenet, tinyimagenet, folder"
    assert keys["data.resize"].accepts.startswith("checked against other keys: data.image_size must be positive")
    assert keys["data.flip"].accepts == ""  # a bool: nothing to probe
    assert (keys["train.epochs"].resume, keys["seed"].resume) == ("may change", "refused")
    assert keys["optim.milestones"].resume == "applied to the restored state"
    assert keys["data.root"].execution and not keys["optim.lr"].execution
    ffsd = {i.key: i for i in ref.method_keys("ffsd")}
    assert ffsd["method.num_students"].accepts == ">= 2" and ffsd["method.num_students"].default == 2
    dml = {i.key: i for i in ref.method_keys("dml")}
    assert dml["method.deploy_net"].accepts == "0..1"  # checked against num_nets=2
    assert dml["method.target"].accepts == "one of pairwise, mean_of_others"
    one = {i.key: i for i in ref.method_keys("one")}
    assert one["method.deploy_branch"].accepts == "-4..3"  # 4 branches; negative indices count from the last
    kd = {i.key: i for i in ref.method_keys("kd")}
    assert kd["method.teacher_model"].accepts == "required"
    assert kd["method.teacher_checkpoint"].resume == "may change"


def test_descriptions_are_the_fields_source_comments():
    keys = {i.key: i for i in ref.run_keys()}
    assert keys["data.limit_train"].doc == "first N training images (quick runs and tests)"  # end of line
    assert keys["model.members"].doc.startswith("the cohort, network by network")  # #: lines above
    cl = {i.key: i for i in ref.method_keys("cl_ilr")}
    assert cl["method.dropout"].doc.startswith("dropout of branch classifiers")  # inherited from BranchParams
    assert cl["method.grad_rescale"].doc == "ILR: scale the trunk's incoming gradient by 1/m"


@dataclass
class _Knobs:
    #: above
    ratio: float = 0.5  # beside
    count: int = 3
    plain: bool = True


def test_comments_and_probed_ranges_on_a_hand_made_dataclass():
    assert ref.field_comments(_Knobs) == {"ratio": "above beside", "count": "", "plain": ""}

    def unit_interval(v):  # (0, 1]
        if not 0 < v <= 1:
            raise ConfigError(f"ratio must be in (0, 1], got {v}")

    def from_two(v):
        if v < 2:
            raise ConfigError(f"count must be >= 2, got {v}")

    def blames_another_key(v):
        raise ConfigError(f"other must be set, got {v}")

    assert ref.accepted_values(unit_interval, "ratio", "float", 0.5) == "(0, 1]"
    assert ref.accepted_values(from_two, "count", "int", 3) == ">= 2"
    assert ref.accepted_values(blames_another_key, "count", "int", 3) == ""  # refusals that do not name the key
    assert ref.accepted_values(from_two, "plain", "bool", True) == ""


def test_sections_methods_and_method_parameters(capsys):
    assert main(["config", "--explain", "optim"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("optim.lr: float = 0.1") and "train." not in out
    assert main(["config", "--explain", "ffsd"]) == 0
    assert "method.num_students: int = 2" in capsys.readouterr().out
    assert main(["config", "--explain", "ffsd.temperature"]) == 0
    assert capsys.readouterr().out.startswith("# ffsd\nmethod.temperature: float = 2.0")
    assert main(["config", "--explain", "method.temperature"]) == 0
    out = capsys.readouterr().out
    assert "# ffsd\nmethod.temperature: float = 2.0" in out and "# dml\nmethod.temperature: float = 3.0" in out


def test_an_unknown_key_gets_the_close_names(capsys):
    assert main(["config", "--explain", "trian.epochs"]) == 2
    err = capsys.readouterr().err
    assert helpers.mentions(err, "'trian.epochs' is no config key, section or method (did you mean train.epochs")


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["config", "cifar10/ffsd_resnet20", "--explain"], "not 'cifar10/ffsd_resnet20' besides it"),
        (["config", "--explain", "seed", "--markdown"], "give no key with it"),
        (["config", "seed=3"], "okd config needs a config"),
    ],
)
def test_explain_is_refused_with_a_config_and_a_config_is_needed_without_it(capsys, argv, text):
    assert main(argv) == 2
    assert helpers.mentions(capsys.readouterr().err, text)
