"""The report subcommands of the ``okd`` CLI: report, compare, sweep, plot, attention, export, predict.

``register_cli(subparsers)`` adds them to the parser of ``okd.cli``; each handler returns an exit code and
raises :class:`~okd.errors.OKDError` for the CLI to print.
"""

from __future__ import annotations

import argparse

from okd.errors import ConfigError
from okd.extras import require
from okd.report.attention import draw_attention
from okd.report.compare import compare
from okd.report.export import FORMATS, TOLERANCE, export
from okd.report.plots import plot_curves
from okd.report.predict import load_predictor, predict_readable
from okd.report.sweep import run_sweep, sweep_commands, with_recipe
from okd.report.sweep_file import load_sweep_file
from okd.report.tables import report


def cmd_report(args: argparse.Namespace) -> int:
    print(report(args.run_dirs, markdown=args.markdown, csv_path=args.csv))
    for label, path in (("Markdown", args.markdown), ("CSV", args.csv)):
        if path:
            print(f"{label} written to {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    print(compare(args.run_dirs, args.allow_mixed_recipes, markdown=args.markdown, csv_path=args.csv), end="")
    for label, path in (("Markdown", args.markdown), ("CSV", args.csv)):
        if path:
            print(f"{label} written to {path}")
    return 0


def _split_seeds(items: list[str]) -> tuple[list[int], list[str]]:
    """``--seeds 1 2 3 key=value``: argparse hands the overrides to --seeds; take them back."""
    seeds, rest = [], []
    for item in items:
        if not rest and item.lstrip("-").isdigit():
            seeds.append(int(item))
        else:
            rest.append(item)
    bad = [r for r in rest if "=" not in r]
    if bad:
        raise ConfigError(f"--seeds takes integers; {bad} are neither seeds nor key=value overrides")
    return seeds, rest


CLUSTER_OPTIONS = ("partition", "time", "gpus_per_node", "cpus_per_task", "array_parallelism", "job_dir")


def _sweep_inputs(args: argparse.Namespace) -> tuple[list, list[int], list[str], list[str]]:
    """``(configs, seeds, overrides, left-out notes)`` from the command line and, with ``--file``, a sweep file;
    the command line's seeds and recipe replace the file's, its overrides follow the file's."""
    seeds, extra = _split_seeds(args.seeds or [])
    items = [args.config, *args.overrides] if args.config is not None else list(args.overrides)
    configs = [i for i in items if "=" not in i]  # okd sweep A B ... key=value
    overrides = [*(i for i in items if "=" in i), *extra]
    recipe, left_out = args.recipe, []
    if args.file:
        if configs:
            raise ConfigError(f"give the configs in the sweep file or on the command line, not both ({configs})")
        plan = load_sweep_file(args.file)
        configs, seeds = plan.runs, seeds or plan.seeds
        overrides = [*plan.overrides, *overrides]
        recipe = recipe or plan.recipe
        left_out = [", ".join(f"{k}={v}" for k, v in item.items()) for item in plan.left_out]
    elif not configs:
        raise ConfigError("okd sweep needs configs (okd sweep CONFIG [CONFIG ...]) or a sweep file (--file PLAN.yaml)")
    return configs, seeds, with_recipe(overrides, recipe), left_out


def cmd_sweep(args: argparse.Namespace) -> int:
    configs, seeds, overrides, left_out = _sweep_inputs(args)
    given = [f"--{k.replace('_', '-')}" for k in CLUSTER_OPTIONS if getattr(args, k) is not None]
    if given and not args.launcher:
        raise ConfigError(f"{', '.join(given)} only apply with --launcher slurm|local")
    if args.print and args.launcher:
        raise ConfigError("--print and --launcher exclude each other: print the commands, or submit the jobs")
    if args.print:
        print("\n".join(sweep_commands(configs, seeds, overrides)))
        for item in left_out:
            print(f"# left out: {item}")
        return 0
    if args.launcher:
        return _launch(args, configs, seeds, overrides)
    runs = run_sweep(configs, seeds, overrides)
    print("run folders:\n  " + "\n  ".join(map(str, runs)))
    print(f"summary: okd report {' '.join(map(str, runs))}")
    print(f"side by side: okd compare {' '.join(map(str, runs))}")
    return 0


def _launch(args: argparse.Namespace, configs: list[str], seeds: list[int], overrides: list[str]) -> int:
    require("submitit", "slurm")
    from okd.report.launch import ClusterOptions, launch_sweep  # the launcher is the submitit extra itself

    values = {k: getattr(args, k) for k in CLUSTER_OPTIONS}
    opts = ClusterOptions(time_min=values.pop("time"), **values)
    jobs = launch_sweep(configs, seeds, overrides, args.launcher, opts)
    verb = "ran" if args.launcher == "local" else "submitted"
    print(f"{verb} {len(jobs)} job(s) through submitit ({args.launcher}):")
    for job_id, run_dir in jobs:
        print(f"  job {job_id} -> {run_dir}")
    when = " once they finish" if args.launcher == "slurm" else ""
    print(f"summary{when}: okd report {' '.join(str(r) for _, r in jobs)}")
    print(f"side by side{when}: okd compare {' '.join(str(r) for _, r in jobs)}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    print(f"wrote {plot_curves(args.run_dir, args.out)}")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    res = draw_attention(
        args.run_dir,
        args.out,
        num_images=args.images,
        first_image=args.first,
        which=args.checkpoint,
        similarity_images=args.similarity_images,
        overrides=args.overrides,
    )
    print(f"wrote {res.figure} ({', '.join(res.names)})")
    if res.similarity_figure is not None:
        print(f"wrote {res.similarity_figure} and {res.similarity_csv}\n")
        print(res.table())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    res = export(args.run_dir, args.format, args.out, which=args.checkpoint, overrides=args.overrides)
    print(f"wrote {res.path} ({res.format})")
    if res.max_abs_diff is None:
        print(f"round trip: {res.checked_with}")
    else:
        print(
            f"round trip ({res.checked_with}): max |logit diff| {res.max_abs_diff:.3g} "
            f"(tolerance {TOLERANCE[res.format]:g})"
        )
    if res.training_diff is not None:
        print(f"same logits as the method's deployed head in training: max |diff| {res.training_diff:.3g}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Top classes of every readable image; unreadable ones are listed at the end and make the exit status 1."""
    pred = load_predictor(args.model)
    print("\n".join(pred.describe()))
    results, unreadable = predict_readable(pred, args.images, top=args.top)
    for image, top in zip(args.images, results, strict=True):
        if top is None:
            continue
        print(image)
        for rank, (name, p) in enumerate(top, start=1):
            print(f"  {rank}. {name:<20} {100 * p:6.2f}%")
    if unreadable:
        print(f"\n{len(unreadable)} of {len(args.images)} image(s) could not be read (nothing predicted for them):")
        for path, reason in unreadable:
            print(f"  {path}: {reason}")
        return 1
    return 0


def register_cli(subparsers) -> None:
    """Add the report subcommands to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser("report", help="mean ± std over seeds of every head, next to the published figures")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (or folders of runs)")
    p.add_argument("--markdown", metavar="OUT.md", help="also write the Markdown here")
    p.add_argument("--csv", metavar="OUT.csv", help="also write the table as CSV here")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser(
        "compare", help="methods side by side under one recipe: final top-1, gain over the baseline, cost"
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (or folders of runs)")
    p.add_argument(
        "--allow-mixed-recipes",
        action="store_true",
        help="lay runs of different recipes (or recipe settings) in one table, marked as mixed, instead of refusing",
    )
    p.add_argument("--markdown", metavar="OUT.md", help="also write the Markdown here")
    p.add_argument("--csv", metavar="OUT.csv", help="also write the table as CSV here")
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser(
        "sweep",
        help="run configs (methods) under several seeds and one recipe, print the commands, or submit them "
        "(SLURM via submitit)",
    )
    p.add_argument("config", nargs="?", help="config (packaged name or YAML file); more configs may follow")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="[CONFIG ...] key=value",
        help="further configs, then overrides applied to every run",
    )
    p.add_argument("--seeds", nargs="+", metavar="SEED", help="seeds, e.g. --seeds 1 2 3 (a sweep file may give them)")
    p.add_argument("--recipe", metavar="NAME", help="run every config under this recipe (okd recipes lists them)")
    p.add_argument(
        "--file", metavar="PLAN.yaml", help="a sweep file: configs, seeds, recipe, overrides (benchmarks/sweeps/)"
    )
    p.add_argument("--print", action="store_true", help="print one `okd train` command per config and seed instead")
    p.add_argument(
        "--launcher",
        choices=("slurm", "local"),
        help="submit one job per config and seed through submitit (needs okd[slurm]); a requeued job resumes "
        "its run folder; local: the same jobs as local processes, waited for",
    )
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--time", type=int, metavar="MINUTES", help="wall-time limit of each job (required for slurm)")
    p.add_argument("--gpus-per-node", type=int, metavar="N", help="GPUs per job")
    p.add_argument("--cpus-per-task", type=int, metavar="N", help="CPU cores per job")
    p.add_argument("--array-parallelism", type=int, metavar="N", help="SLURM: jobs of the array running at once")
    p.add_argument("--job-dir", metavar="DIR", help="submitit's scripts and logs (default <output_dir>/submitit)")
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser("plot", help="training curves of every head and loss term (needs okd[plot])")
    p.add_argument("run_dir", help="run folder (its metrics.csv)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(func=cmd_plot)

    p = subparsers.add_parser("attention", help="attention maps of each network on test images (needs okd[plot])")
    p.add_argument("run_dir", help="run folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=/elsewhere")
    p.add_argument("--images", type=int, default=6, help="test images to draw (default 6)")
    p.add_argument("--first", type=int, default=0, help="index of the first test image (default 0)")
    p.add_argument("--similarity-images", type=int, default=500, help="test images for the similarity table")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last", help="last.pt (default) or best.pt")
    p.add_argument("--out", help="PNG path (default RUN_DIR/attention.png)")
    p.set_defaults(func=cmd_attention)

    p = subparsers.add_parser("export", help="write the deployable network alone, with a round-trip check")
    p.add_argument("run_dir", help="run folder, deploy.pt or run checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (rebuilding from a checkpoint)")

    p.add_argument("--format", required=True, choices=FORMATS, help="safetensors: pickle-free (okd[safetensors])")
    p.add_argument("--out", help="output file (default RUN_DIR/export/<model>_<format>)")
    p.add_argument(
        "--checkpoint", choices=("last", "best"), default="last", help="for a run folder: last (deploy.pt) or best.pt"
    )
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("predict", help="top-5 classes of image files")
    p.add_argument("model", help="run folder, deploy.pt, exported state_dict, safetensors, TorchScript or ONNX file")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (resized to the network's input size)")
    p.add_argument("--top", type=int, default=5, help="classes shown per image (default 5)")
    p.set_defaults(func=cmd_predict)
