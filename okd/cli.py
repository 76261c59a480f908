"""``okd``: the command-line entry point (train, test, configs, config, models, methods; report and bench commands).

Every subcommand takes its options and ``key=value`` overrides in any order (:func:`parse_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import signal
import sys
import textwrap
import time

from okd import __version__, bench
from okd.config import EXECUTION_KEYS, flatten, recipe_run
from okd.configs import packaged_configs, read_recipe, recipe_datasets, recipe_names
from okd.engine.run_log import head_label, ordered_heads, run_summary
from okd.engine.threads import warn_threads_once
from okd.engine.trainer import config_from_run, train
from okd.errors import OKDError
from okd.methods import METHODS
from okd.methods.build import load_config
from okd.models import count_macs, count_parameters, create_model, list_models
from okd.models.registry import MODELS
from okd.report import commands as report_commands
from okd.report import config_reference
from okd.report.scoring import PRECISIONS, score_checkpoint
from okd.runs.metrics import best_in_history

DESCRIPTION = """\
okd: online knowledge distillation (FFSD, DML, KD, ONE, CL-ILR, OKDDip, FFL, ...).

Typical use:
  okd train cifar100/ffsd_resnet32                              train a packaged config (downloads CIFAR)
  okd train cifar10/baseline_resnet20 data.root=~/data train.epochs=5 seed=3
  okd train --resume runs/<name>                                continue a stopped run exactly
  okd test runs/<name> [--checkpoint best]                      top-1/top-5 of every head on the test split
  okd configs | okd config cifar10/ffsd_resnet20 seed=3         packaged configs; one resolved config
  okd config --explain [KEY|SECTION|METHOD]                     what every key means: type, default, range, resume
  okd recipes | okd train cifar100/dml_resnet32 recipe=ffsd     recipes; a method under another paper's recipe
  okd models | okd methods                                      what can be trained
  okd bench cifar100/ffsd_resnet32                              speed, side by side with the reference recipe
  okd sweep CONFIG --seeds 1 2 3 ; okd report runs/...          seeds, mean ± std next to published numbers
  okd compare runs/...                                          methods side by side under one recipe
  okd plot RUN | okd attention RUN | okd export RUN --format onnx | okd predict MODEL IMAGE...

A config is a packaged name (`okd configs`) or a YAML file. Values are overridden with key=value
(sections: data, model, method, optim, train; top level: name, output_dir, seed, recipe), before or after
the options. An unknown key fails at once and lists the valid ones.
"""

#: ``key=value`` (a config override), as opposed to an option value or a file name
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\-]*=")


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_train(args: argparse.Namespace) -> int:
    config_path, overrides = _split_config_and_overrides(args.items)
    if args.resume:
        cfg = load_config(config_path, overrides) if config_path else config_from_run(args.resume, overrides)
        train(cfg, run_dir=args.resume, resume=True)
        return 0
    if config_path is None:
        raise OKDError(
            "okd train needs a config (a packaged name such as cifar100/ffsd_resnet32, or a YAML file) or --resume RUN"
        )
    cfg = load_config(config_path, overrides)
    run_dir = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"run folder: {run_dir}")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    warn_threads_once()
    metrics, info = score_checkpoint(
        args.path, which=args.checkpoint, overrides=args.overrides, precision=args.precision
    )
    print(f"{info['path']} (epoch {info['epoch']})")
    if info["run_precision"] != "fp32":  # said where it matters: a run trained and scored under autocast
        print(precision_line(info["precision"], info["run_precision"]))
    if info.get("note"):
        print(textwrap.fill(f"note: {info['note']}", 100))
    head, networks = info["deploy_head"], info.get("labels") or {}
    heads = ordered_heads(list({k.rsplit("/", 1)[0] for k in metrics}), head)
    labels = {h: ("*" if h == head else "") + head_label(h, networks, " ") for h in heads}
    width = max(len(head_label(h, networks, " ")) for h in heads) + 1
    print(f"{'head':<{width}}  {'top1':>7}  {'top5':>7}   (* deployed)")
    for name in heads:
        top5 = metrics.get(f"{name}/top5")
        top5_text = f"{top5:7.2f}" if top5 is not None else f"{'-':>7}"
        print(f"{labels[name]:<{width}}  {metrics[f'{name}/top1']:7.2f}  {top5_text}")
    run = info["run"]  # the run folder as last.pt commits it; None for a file outside a run folder
    best = best_in_history(run.history, head) if run is not None else None
    deploy = run.dir / "deploy.pt" if run is not None and (run.dir / "deploy.pt").is_file() else None
    wall = time.perf_counter() - started
    summary = run_summary(head, metrics[f"{head}/top1"], info["epoch"], best, deploy, wall)
    print("\n" + summary)
    return 0


def precision_line(used: str, run: str) -> str:
    """Which precision ``okd test`` evaluated under, beside the run's own."""
    if used == run:
        extra = " (--precision fp32: full precision)" if run != "fp32" else ""
        return f"evaluated under {used}, the run's precision, as training scored its epochs{extra}"
    return f"evaluated under {used} (--precision); training scored its epochs under {run}, so figures may differ"


def cmd_configs(args: argparse.Namespace) -> int:
    print("\n".join(packaged_configs()))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.explain is not None or args.markdown:
        if args.name is not None or args.overrides:
            given = " ".join([args.name or "", *args.overrides]).strip()
            raise OKDError(
                f"okd config --explain takes one key, section or method (okd config --explain train.epochs), not "
                f"{given!r} besides it"
            )
        if args.markdown and args.explain:
            raise OKDError("okd config --explain --markdown prints the whole reference; give no key with it")
        print(config_reference.markdown() if args.markdown else config_reference.explain(args.explain), end="")
        return 0
    config_path, overrides = _split_config_and_overrides([args.name, *args.overrides] if args.name else [])
    if config_path is None:
        raise OKDError("okd config needs a config (okd config cifar10/ffsd_resnet20 seed=3), or --explain [KEY]")
    print(load_config(config_path, overrides).to_yaml(), end="")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    what = args.which or ""
    if "/" in what:  # one recipe: every setting it gives
        dataset, name = what.split("/", 1)
        run = recipe_run(dataset, name)
        settings = {k: v for k, v in flatten(_run_settings(run)).items() if k not in EXECUTION_KEYS}
        print(f"# {dataset}/{name}: {read_recipe(dataset, name).get('description', '')}")
        print("\n".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in settings.items()))
        return 0
    datasets = [what] if what else recipe_datasets()
    if what and what not in recipe_datasets():
        raise OKDError(f"okd ships no recipes for {what!r}; it has recipes for {', '.join(recipe_datasets())}")
    for dataset in datasets:
        for name in recipe_names(dataset):
            print(f"{dataset + '/' + name:<24} {read_recipe(dataset, name).get('description', '')}")
    return 0


def _run_settings(run) -> dict:
    """The recipe sections of a run config and its seed, as a plain mapping."""
    return {"seed": run.seed, **{s: dataclasses.asdict(getattr(run, s)) for s in ("data", "optim", "train")}}


def cmd_models(args: argparse.Namespace) -> int:
    warn_threads_once()

    print(f"{'model':<22} {'params (K=' + str(args.num_classes) + ')':>16} {'MACs per image':>16}  input")
    for name in list_models():
        net = create_model(name, args.num_classes)
        side = 224 if MODELS.info(name).get("stem") == "imagenet" else 32  # each model's native resolution
        macs = count_macs(net, (1, 3, side, side))
        print(f"{name:<22} {count_parameters(net):>16,} {macs / 1e6:>14.2f} M  {side}x{side}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    for name in METHODS.names():
        info = METHODS.info(name)
        print(f"{name:<12} {info['description']}  [{info['paper']}]")
    return 0


def version() -> str:
    """The installed distribution's version, else the source tree's ``okd.__version__``."""
    try:
        return importlib.metadata.version("okd")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="okd", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"okd {version()}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a config (or resume a run)")
    p.add_argument(
        "items", nargs="*", metavar="CONFIG [key=value ...]", help="packaged config name or YAML file, then overrides"
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last epoch")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("test", help="evaluate every head of a run on the test split")
    p.add_argument("path", help="run folder, run checkpoint (last.pt, best.pt) or deploy.pt")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=/elsewhere")
    p.add_argument(
        "--checkpoint", choices=("last", "best"), default="last", help="for a run folder: last.pt (default) or best.pt"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="run",
        help="run (default): under the run's train.precision, as training scored its epochs (the figures of its "
        "log and metrics.csv); fp32: full precision",
    )
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("configs", help="list the packaged configs (names for okd train, okd config, ...)")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser(
        "config",
        help="print a config fully resolved (defaults, file and overrides), as YAML; --explain: what each key means",
    )
    p.add_argument("name", nargs="?", metavar="CONFIG", help="packaged config name (okd configs) or YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seed=3")
    p.add_argument(
        "--explain",
        nargs="?",
        const="",
        metavar="KEY|SECTION|METHOD",
        help="the reference of every key (type, default, accepted values, resume), or of one key (train.epochs), "
        "section (optim), method (ffsd) or method parameter (method.temperature); docs/config-reference.md",
    )
    p.add_argument("--markdown", action="store_true", help="with --explain: the reference as docs/config-reference.md")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("recipes", help="list the recipes (a paper's data, optimiser, schedule and epochs)")
    p.add_argument(
        "which", nargs="?", metavar="DATASET[/NAME]", help="one dataset's recipes, or every setting of one recipe"
    )
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("models", help="list backbones with parameter and MAC counts")
    p.add_argument("--num-classes", type=int, default=100, help="classes of the counted classifier (default 100)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("methods", help="list the registered methods")
    p.set_defaults(func=cmd_methods)

    bench.register_cli(sub)
    report_commands.register_cli(sub)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers of ``parser`` by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _free_overrides(sub: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Move ``key=value`` tokens out of the values of variable-length options (``--seeds 1 2 key=value``),
    so that argparse hands them to the subcommand's positional overrides wherever they stand."""
    greedy = {s for a in sub._actions if a.option_strings and a.nargs in ("+", "*") for s in a.option_strings}
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            out += argv[i:]
            break
        if token not in greedy:  # (``--seeds=1`` carries its one value itself)
            out.append(token)
            i += 1
            continue
        j = i + 1
        while j < len(argv) and not argv[j].startswith("-"):
            j += 1
        values = argv[i + 1 : j]
        out += [v for v in values if _OVERRIDE.match(v)] + [token] + [v for v in values if not _OVERRIDE.match(v)]
        i = j
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse an ``okd`` command line; a subcommand's options and ``key=value`` overrides may come in any order."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    subcommands = _subcommands(parser)
    if not argv or argv[0] not in subcommands:
        return parser.parse_args(argv)  # help, --version, or an unknown command (argparse says so)
    sub = subcommands[argv[0]]
    args = sub.parse_intermixed_args(_free_overrides(sub, argv[1:]))
    args.command = argv[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not getattr(args, "func", None):
        build_parser().print_help()
        return 0
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe (okd models | head) raises here, not at interpreter exit
        return code
    except OKDError as exc:
        print(textwrap.fill(f"okd: error: {exc}", 100, break_on_hyphens=False), file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: 130; SIGTERM (StopRequested): 143
        return 128 + getattr(exc, "signum", signal.SIGINT)
    except BrokenPipeError:
        # the reader went away: stop quietly, and keep Python's final flush from raising again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
