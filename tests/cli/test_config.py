"""Config loading, overrides and validation errors."""

from __future__ import annotations

import re

import pytest

from okd.config import shape_error
from okd.errors import ConfigError
from okd.methods.build import load_config

BASE = "cifar10/baseline_resnet20"


def test_yaml_and_overrides_are_typed():
    cfg = load_config(BASE, ["train.epochs=5", "seed=3", "data.root=/x", "optim.milestones=[2,4]"])
    assert cfg.run.train.epochs == 5 and cfg.run.seed == 3 and cfg.run.data.root == "/x"
    assert cfg.run.optim.milestones == [2, 4]
    assert cfg.run.optim.weight_decay == pytest.approx(1e-4)
    assert cfg.method_name == "baseline"
    assert "method" in cfg.to_dict() and cfg.to_dict()["method"]["name"] == "baseline"


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(BASE, ["train.epoch=5"])
    assert "epoch" in str(err.value) and "epochs" in str(err.value) and "max_steps_per_epoch" in str(err.value)


def test_wrong_type_fails():
    with pytest.raises(ConfigError, match="epochs"):
        load_config(BASE, ["train.epochs=many"])


@pytest.mark.parametrize(
    "override, text",
    [
        ("train.epochs=-1", "train.epochs must be positive"),
        ("data.batch_size=0", "data.batch_size must be positive"),
        ("data.dataset=mnist", "cifar10, cifar100"),
        ("data.padding_mode=edge", "reflect, zeros"),
        ("method.name=nope", "unknown method 'nope'"),
        ("data.mean=[0.5]", "3 values"),
        ("train.device=tpu", "train.device"),
    ],
)
def test_bad_values_fail_before_training(override, text):
    with pytest.raises(ConfigError, match=text):
        load_config(BASE, [override])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(BASE, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- data\n- model\n")
    with pytest.raises(ConfigError, match=r"list.yaml' must hold a mapping of sections \(data, model, ...\)"):
        load_config(listed)


@pytest.mark.parametrize("bad", ["data.mean=[1,2", "optim.milestones=}"])
def test_an_override_whose_value_is_not_yaml_is_named_in_a_config_error(bad):
    """A value YAML cannot parse (an unclosed bracket) is an okd error that names the override, not a traceback."""
    with pytest.raises(ConfigError, match=rf"cannot parse the override '{re.escape(bad)}': .*Quote the value"):
        load_config(BASE, ["seed=1", bad])


@pytest.mark.slow
def test_every_shipped_config_validates():
    from okd.configs import packaged_configs

    configs = packaged_configs()
    assert "cifar10/baseline_resnet20" in configs and "cifar100/ffsd_resnet32" in configs
    for name in configs:
        load_config(name)


@pytest.mark.parametrize(
    "override, text",
    [
        ("optim.lr=nan", "optim.lr=nan is not a finite number"),
        ("optim.lr=inf", "optim.lr=inf is not a finite number"),
        ("optim.momentum=nan", "optim.momentum=nan is not a finite number"),
        ("optim.momentum=1.5", "optim.momentum must be in"),
        ("optim.weight_decay=-1e-4", "optim.weight_decay must be >= 0"),
        ("optim.gamma=0", "optim.gamma must be positive"),
        ("optim.gamma=-inf", "optim.gamma=-inf is not a finite number"),
        ("optim.milestones=[0,5]", "optim.milestones are epochs"),
        ("optim.warmup_epochs=-1", "optim.warmup_epochs must be >= 0"),
        ("data.pad=-2", "data.pad must be >= 0"),
        ("data.workers=-1", "data.workers must be >= 0"),
        ("data.std=[0.2,0,0.2]", "data.std must be positive"),
        ("data.mean=[0.5,nan,0.5]", "data.mean=.* is not a finite number"),
        ("optim.momentum=1", r"optim.momentum must be in \[0, 1\), got 1"),
        ("optim.momentum=-0.1", "optim.momentum must be in"),
        ("optim.reference_batch=0", "optim.reference_batch must be positive"),
        ("optim.lr=0", "optim.lr must be positive"),
        ("data.test_batch_size=0", "data.test_batch_size must be positive"),
        ("data.limit_train=0", "data.limit_train must be positive or null"),
        ("data.limit_test=-1", "data.limit_test must be positive or null"),
        ("data.holdout=-1", "data.holdout must be >= 0"),
        ("data.std=[0.2,-0.1,0.2]", "data.std must be positive"),
        ("data.std=[0.2,0.2]", "data.std needs 3 values"),
        ("data.image_size=0", "data.image_size must be positive"),
        ("data.resize=16", "data.resize .* not smaller than it"),
        ("train.max_steps_per_epoch=0", "train.max_steps_per_epoch must be positive or null"),
        ("train.max_steps_per_epoch=-2", "train.max_steps_per_epoch must be positive or null"),
        ("data.sampler=m_per_class data.dataset=imagenet", "data.sampler=m_per_class works with the CIFAR loaders"),
        ("train.eval_every=0", "train.eval_every must be a positive number of epochs, got 0"),
        ("train.log_every_steps=-1", r"train.log_every_steps must be >= 0 \(0: off\), got -1"),
        ("train.log_every_seconds=-5", r"train.log_every_seconds must be >= 0 \(0: off\), got -5"),
        ("train.track_every_steps=-1", r"train.track_every_steps must be >= 0 \(0: off\), got -1"),
        (
            "data.sampler=m_per_class data.m_per_class=0",
            "data.m_per_class must be >= 1 and divide data.batch_size, got m_per_class=0",
        ),
        ("data.sampler=m_per_class data.m_per_class=3", "divide data.batch_size, got m_per_class=3, batch_size=128"),
    ],
)
def test_numeric_values_are_finite_and_in_range(override, text):
    with pytest.raises(ConfigError, match=text):
        load_config(BASE, override.split())


def test_method_numbers_are_finite():
    with pytest.raises(ConfigError, match="method.temperature=inf is not a finite number"):
        load_config("cifar10/ffsd_resnet20", ["method.temperature=inf"])


def test_values_at_the_edge_of_their_range_are_accepted():
    """The lower ends of the ranges are allowed: no momentum, no weight decay, no padding, ..."""
    edges = [
        "optim.momentum=0",
        "optim.weight_decay=0",
        "optim.warmup_epochs=0",
        "optim.milestones=[1]",
        "data.pad=0",
        "data.workers=0",
        "data.holdout=0",
        "data.limit_train=1",
        "train.max_steps_per_epoch=1",
        "data.image_size=32",
        "data.resize=32",
        "train.eval_every=1",
        "train.log_every_steps=0",
        "train.log_every_seconds=0",
        "train.track_every_steps=0",
    ]
    cfg = load_config(BASE, edges)
    assert cfg.run.optim.momentum == 0 and cfg.run.train.max_steps_per_epoch == 1 and cfg.run.data.resize == 32


@pytest.mark.parametrize(
    "override, text",
    [
        ("model.taps=[layer1]", "model.taps and model.branch_from are for your own or timm networks"),
        ("model.branch_from=layer2", "model.taps and model.branch_from are for your own or timm networks"),
        ("model.pretrained=true", "model.pretrained/model.weights are for timm"),
        ("model.weights=/w.pt", "model.pretrained/model.weights are for timm"),
    ],
)
def test_model_section_is_checked_when_the_config_is_built(override, text):
    """A registered backbone refuses taps, a branch split and timm weights when the config is loaded, before data."""
    with pytest.raises(ConfigError, match=text):
        load_config(BASE, [override])


def test_the_method_section_must_be_a_mapping():
    from okd.methods.build import build_config

    for bad in ("ffsd", 5, ["dml"]):
        with pytest.raises(ConfigError, match="the method section must be a mapping, e.g. method: {name: ffsd}"):
            build_config({"method": bad})
    assert build_config({"method": None}).method_name == "baseline"  # an empty section: the default method


def test_method_defaults_of_known_and_unknown_methods():
    from okd.methods.build import method_class, method_defaults

    assert method_defaults("kdcl")["temperature"] == 4.0 and method_defaults("kdcl")["ensemble"] == "naive"
    assert method_defaults("not-a-method") is None and method_class("not-a-method") is None


@pytest.mark.parametrize(
    "path, overrides, says",
    [
        (BASE, ["data.mean.x=0.5"], r"data.mean: a mapping where a value or a list belongs; `okd config --explain"),
        (None, ["model.members.x=1"], r"bad value for model.members: a mapping where a value or a list belongs"),
        (BASE, ["optim.milestones.first=5"], r"bad value for optim.milestones: a mapping where a value or a list"),
        (
            BASE,
            ["data=[1,2]"],
            r"bad value for data: a list where a section of keys belongs; `okd config --explain data`",
        ),
        (None, ["data=[1,2]"], r"bad value for data: .*list is not a subclass of DataConfig"),
        (None, ["data.batch_size=64", "model.members.x=1"], r"bad value for model.members: a mapping where a value"),
        (None, ["method.name=kdcl", "method.models.x=1"], r"bad value for method.models: a mapping where a value"),
    ],
)
def test_a_mapping_or_list_in_the_wrong_place_is_named_in_a_config_error(path, overrides, says):
    """A mapping where a value or list belongs (``data.mean.x=...``), or a list where a section belongs, is refused
    with the key it was given for, whether the clash is with the config file or with the typed defaults."""
    with pytest.raises(ConfigError, match=says):
        load_config(path, overrides)


def test_a_shape_clash_no_key_explains_still_reads_as_a_sentence():
    assert str(shape_error("", "")) == "bad value in the config: a mapping and a list meet at the same key"
    assert str(shape_error("data", "list")).startswith("bad value for data: a list where a section of keys belongs;")
