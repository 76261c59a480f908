"""``okd bench`` / ``python -m okd.bench``: arguments, the command line of a run, printing."""

from __future__ import annotations

import argparse
import shlex
import sys

from okd.bench.run import bench
from okd.bench.table import format_table
from okd.errors import OKDError
from okd.methods.build import load_config

DESCRIPTION = "time a config's training step, side by side with the standard-recipe reference path"


def cmd_bench(args: argparse.Namespace) -> int:
    """``okd bench CONFIG [key=value ...]``."""
    if not args.items or "=" in args.items[0]:
        raise OKDError("okd bench needs a config file first, e.g. okd bench configs/cifar100/ffsd_resnet32.yaml")
    config_path, overrides = args.items[0], args.items[1:]
    cfg = load_config(config_path, overrides)
    command = command_line(args)
    report = bench(
        cfg, config_name=config_path, steps=args.steps, warmup=args.warmup, windows=args.windows,
        reference=args.reference, workers=args.workers, synthetic=args.synthetic, check_syncs=args.check_syncs,
        threads=args.threads, csv_path=args.csv, command=command, also_eager=args.also_eager,
    )  # fmt: skip
    print(format_table(report))
    if args.csv is not None:
        print(f"appended {len(report.rows)} row(s) to {args.csv}")
    else:
        print("no CSV written (pass --csv PATH to append these rows to a CSV file)")
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The ``okd bench`` command that reproduces ``args`` (defaults spelled out)."""
    parts = ["okd", "bench", *args.items, "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--windows", str(args.windows), "--reference" if args.reference else "--no-reference"]  # fmt: skip
    for flag, value in (("--workers", args.workers), ("--threads", args.threads)):
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--synthetic"] * args.synthetic + ["--check-syncs"] * args.check_syncs
    parts += ["--also-eager"] * args.also_eager
    parts += ["--csv", args.csv] if args.csv is not None else []
    return " ".join(shlex.quote(p) for p in parts)


def main(argv: list[str] | None = None, prog: str = "python -m okd.bench") -> int:
    """``python -m okd.bench CONFIG [key=value ...] [options]``, the same as ``okd bench``.

    Also the lazy way to wire the CLI without importing torch at start-up: a ``bench`` subparser that takes
    ``argparse.REMAINDER`` and calls ``okd.bench.main(rest, prog="okd bench")``.
    """
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return cmd_bench(args)
    except OKDError as exc:
        print(f"okd bench: error: {exc}", file=sys.stderr)
        return 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``okd bench``."""
    p.add_argument("items", nargs="+", metavar="CONFIG [key=value ...]", help="YAML config then overrides")
    p.add_argument("--steps", type=int, default=20, help="timed steps per path (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, compile included (default 5)")
    p.add_argument("--windows", type=int, default=5, help="timed steps split in windows; median reported")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the reference path (default on)")  # fmt: skip
    p.add_argument("--workers", type=int, default=None,
                   help="reference DataLoader workers (default: min(8, cores) on a GPU; on the CPU the cores "
                        "left free by the torch threads)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--synthetic", action="store_true", help="synthetic uint8 data even if the dataset is present")
    p.add_argument("--check-syncs", action="store_true", help="GPU: count synchronising calls in one okd step")
    p.add_argument("--also-eager", action="store_true",
                   help="with train.compile=true, also time the uncompiled okd step in the same windows")  # fmt: skip
    p.add_argument("--csv", default=None, metavar="PATH",
                   help="also append the rows to this CSV (header written if new); default: print only")  # fmt: skip


def register_cli(subparsers) -> None:
    """Add ``okd bench`` to the CLI's subparsers (``args.func(args)`` runs it)."""
    p = subparsers.add_parser(
        "bench",
        help="time a config's training step against the standard-recipe reference path",
        description=DESCRIPTION,
    )
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
