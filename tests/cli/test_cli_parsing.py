"""The okd command line: options and key=value overrides in any order, help texts, listings, version, pipes."""

from __future__ import annotations

import argparse
import importlib.metadata
import random
import subprocess
import sys

import helpers
import pytest
import yaml

import okd
from okd.cli import _subcommands, build_parser, main, parse_args, version
from okd.configs import packaged_configs
from okd.errors import ConfigError
from okd.methods.build import load_config

# subcommand -> (positional tokens in their order, option units); every subcommand has one
SAMPLES: dict[str, tuple[list[str], list[list[str]]]] = {
    "train": (["cifar10/ffsd_resnet20", "seed=3", "train.epochs=2"], [["--resume", "runs/x"]]),
    "test": (["runs/x", "data.root=/d", "seed=1"], [["--checkpoint", "best"]]),
    "configs": ([], []),
    "config": (["cifar10/ffsd_resnet20", "seed=3", "method.temperature=4"], []),
    "models": ([], [["--num-classes", "10"]]),
    "methods": ([], []),
    "bench": (
        ["cifar10/ffsd_resnet20", "train.device=cpu", "data.limit_train=64"],
        [["--steps", "5"], ["--warmup", "1"], ["--windows", "2"], ["--synthetic"]],
    ),
    "report": (["runs/a", "runs/b"], [["--markdown", "o.md"], ["--csv", "o.csv"]]),
    "compare": (["runs/a", "runs/b"], [["--allow-mixed-recipes"], ["--markdown", "o.md"], ["--csv", "o.csv"]]),
    "recipes": (["cifar100"], []),
    "sweep": (
        ["cifar10/ffsd_resnet20", "train.epochs=1", "data.limit_train=64"],
        [["--seeds", "1", "2"], ["--print"], ["--recipe", "ffsd"]],
    ),
    "plot": (["runs/a"], [["--out", "c.png"]]),
    "attention": (
        ["runs/a", "data.root=/d"],
        [
            ["--images", "2"],
            ["--first", "1"],
            ["--checkpoint", "best"],
            ["--out", "a.png"],
            ["--similarity-images", "9"],
        ],
    ),
    "export": (["runs/a", "data.root=/d"], [["--format", "onnx"], ["--out", "m.onnx"], ["--checkpoint", "best"]]),
    "predict": (["m.pt", "a.png", "b.png"], [["--top", "3"]]),
}


def _interleave(positionals: list[str], options: list[list[str]], rng: random.Random) -> list[str]:
    """The option units shuffled and inserted at random places after the first positional (the subject:
    config, run or model), the positionals keeping their order."""
    head, rest = positionals[:1], list(positionals[1:])
    units = [list(u) for u in options]
    rng.shuffle(units)
    slots: list[list[str]] = [[p] for p in rest]
    for unit in units:
        slots.insert(rng.randint(0, len(slots)), unit)
    return head + [t for s in slots for t in s]


def test_samples_cover_every_subcommand():
    assert set(SAMPLES) == set(_subcommands(build_parser())), "add a sample for each new subcommand"


@pytest.mark.parametrize("command", sorted(SAMPLES))
def test_options_and_overrides_in_any_order(command):
    positionals, options = SAMPLES[command]
    canonical = vars(parse_args([command, *positionals, *[t for u in options for t in u]]))
    assert canonical["command"] == command
    rng = random.Random(command)
    orders = [[command, *_interleave(positionals, options, rng)] for _ in range(6)]
    orders.append([command, *positionals[:1], *[t for u in reversed(options) for t in u], *positionals[1:]])
    for argv in orders:
        assert vars(parse_args(argv)) == canonical, argv


def test_overrides_after_options_land_in_the_overrides():
    args = parse_args(["test", "runs/x", "--checkpoint", "best", "data.root=/d"])
    assert args.path == "runs/x" and args.checkpoint == "best" and args.overrides == ["data.root=/d"]
    args = parse_args(["export", "runs/x", "data.root=/d", "--format", "onnx"])
    assert args.overrides == ["data.root=/d"] and args.format == "onnx"
    args = parse_args(["bench", "cifar10/ffsd_resnet20", "train.device=cpu", "--steps", "5", "seed=2"])
    assert args.items == ["cifar10/ffsd_resnet20", "train.device=cpu", "seed=2"] and args.steps == 5
    args = parse_args(["sweep", "cifar10/ffsd_resnet20", "--seeds", "1", "2", "train.epochs=1", "--print"])
    assert args.seeds == ["1", "2"] and args.overrides == ["train.epochs=1"] and args.print
    args = parse_args(["train", "--resume", "runs/x", "train.epochs=400"])
    assert args.resume == "runs/x" and args.items == ["train.epochs=400"]


def test_unknown_option_still_fails_with_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["test", "runs/x", "--no-such-option"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: okd test" in err and "--no-such-option" in err


def test_every_option_of_every_subcommand_has_help():
    missing = [
        f"{name} {action.dest}"
        for name, sub in _subcommands(build_parser()).items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert not missing


def test_version_from_metadata_or_the_source_tree(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"okd {version()}"

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert version() == okd.__version__
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.8.7")
    assert version() == "9.8.7"


def test_configs_lists_the_packaged_configs(capsys):
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == packaged_configs() and "cifar100/ffsd_resnet32" in listed


def test_config_prints_the_resolved_config(capsys):
    assert main(["config", "cifar10/ffsd_resnet20", "seed=3", "method.temperature=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config("cifar10/ffsd_resnet20", ["seed=3", "method.temperature=4"]).to_dict()
    assert printed["seed"] == 3 and printed["method"]["temperature"] == 4 and printed["model"]["name"] == "resnet20"
    assert main(["config", "cifar10/ffsd_resnet20", "optim.nope=1"]) == 2
    assert helpers.mentions(capsys.readouterr().err, "unknown config key optim.nope")


@pytest.mark.slow
def test_closed_pipe_ends_quietly():
    """``okd configs | head -0``: no BrokenPipeError traceback, the shell's SIGPIPE status."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "okd", "configs"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc.stdout.close()  # the reader is gone before okd writes (it is still importing)
    err = proc.stderr.read()
    assert proc.wait() == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize(
    "override, text",
    [
        ("optim.nope=1", "unknown config key optim.nope"),
        ("method.bogus=1", "unknown config key method.bogus"),
        ("optim.lr=abc", "bad value for optim.lr: Value 'abc'"),
        ("train.epochs=[1]", "bad value for train.epochs"),
        ("method.temperature=hot", "bad value for method.temperature"),
    ],
)
def test_unknown_key_and_bad_value_read_differently(override, text):
    with pytest.raises(ConfigError) as err:
        load_config("cifar10/ffsd_resnet20", [override])
    message = str(err.value)
    assert text in message
    assert "bad config key" not in message
    assert ("Valid keys here" in message) == text.startswith("unknown")
