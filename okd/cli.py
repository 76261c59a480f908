"""``okd``: the command-line entry point (train, test, models, methods)."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from okd.errors import OKDError

DESCRIPTION = """\
okd: online knowledge distillation (FFSD, DML, KD, ONE, CL-ILR, OKDDip, FFL, ...).

Typical use:
  okd train configs/cifar100/ffsd_resnet32.yaml                 train (downloads CIFAR into data.root)
  okd train configs/cifar10/baseline_resnet20.yaml data.root=~/data train.epochs=5 seed=3
  okd train --resume runs/<name>                                continue a stopped run exactly
  okd test runs/<name>                                          top-1/top-5 of every head on the test split
  okd models | okd methods                                      what can be trained
  okd bench configs/cifar100/ffsd_resnet32.yaml                 speed, side by side with the reference recipe
  okd sweep CONFIG --seeds 1 2 3 ; okd report runs/...          seeds, mean ± std next to published numbers
  okd plot RUN | okd attention RUN | okd export RUN --format onnx | okd predict MODEL IMAGE...

Config values are overridden with key=value (sections: data, model, method, optim, train; top level:
name, output_dir, seed). An unknown key fails at once and lists the valid ones.
"""


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_train(args: argparse.Namespace) -> int:
    from okd.config import load_config
    from okd.engine.trainer import config_from_run, train

    config_path, overrides = _split_config_and_overrides(args.items)
    if args.resume:
        cfg = load_config(config_path, overrides) if config_path else config_from_run(args.resume, overrides)
        train(cfg, run_dir=args.resume, resume=True)
        return 0
    if config_path is None:
        raise OKDError("okd train needs a config file (e.g. configs/cifar100/ffsd_resnet32.yaml) or --resume RUN")
    cfg = load_config(config_path, overrides)
    run_dir = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"run folder: {run_dir}")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from okd.engine.scoring import score_checkpoint

    metrics, info = score_checkpoint(args.path, which=args.checkpoint, overrides=args.overrides)
    print(f"{info['path']} (epoch {info['epoch']})")
    if info.get("note"):
        print(textwrap.fill(f"note: {info['note']}", 100))
    heads = sorted({k.rsplit("/", 1)[0] for k in metrics})
    width = max(len(h) for h in heads)
    print(f"{'head':<{width}}  {'top1':>7}  {'top5':>7}")
    for head in heads:
        top5 = metrics.get(f"{head}/top5")
        top5_text = f"{top5:7.2f}" if top5 is not None else f"{'-':>7}"
        print(f"{head:<{width}}  {metrics[f'{head}/top1']:7.2f}  {top5_text}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from okd.models import count_macs, count_parameters, create_model, list_models
    from okd.models.registry import MODELS

    print(f"{'model':<22} {'params (K=' + str(args.num_classes) + ')':>16} {'MACs per image':>16}  input")
    for name in list_models():
        net = create_model(name, args.num_classes)
        side = 224 if MODELS.info(name).get("stem") == "imagenet" else 32  # each model's native resolution
        macs = count_macs(net, (1, 3, side, side))
        print(f"{name:<22} {count_parameters(net):>16,} {macs / 1e6:>14.2f} M  {side}x{side}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from okd.methods import METHODS

    for name in METHODS.names():
        info = METHODS.info(name)
        print(f"{name:<12} {info['description']}  [{info['paper']}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="okd", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a config (or resume a run)")
    p.add_argument("items", nargs="*", metavar="CONFIG [key=value ...]", help="YAML config then overrides")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last epoch")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("test", help="evaluate every head of a run on the test split")
    p.add_argument("path", help="run folder or checkpoint file")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. data.root=/elsewhere")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last", help="for a run folder")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("models", help="list backbones with parameter and MAC counts")
    p.add_argument("--num-classes", type=int, default=100)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("methods", help="list the registered methods")
    p.set_defaults(func=cmd_methods)

    from okd import bench
    from okd.report import commands as report_commands

    bench.register_cli(sub)
    report_commands.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except OKDError as exc:
        print(textwrap.fill(f"okd: error: {exc}", 100), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
