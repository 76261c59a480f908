"""Expected time of a sweep file, from ``okd bench`` of each of its configs on this machine.

For every run of the sweep (``okd sweep --file``), under the sweep's recipe and overrides: the okd path's
training images/s (``okd bench``, synthetic images of the dataset's shape; speed does not depend on pixel
values), then hours per run = epochs x training images / images/s, and the total over the seeds. Evaluation
and start-up are not counted (a CIFAR evaluation pass is a few seconds per epoch on a GPU). Prints a Markdown
table; ``--csv`` also appends okd bench's rows (hardware, commit and command in each).

    python benchmarks/sweep_time.py benchmarks/sweeps/cifar100_ffsd_recipe.yaml --threads 1       # this CPU
    python benchmarks/sweep_time.py benchmarks/sweeps/cifar100_ffsd_recipe.yaml train.device=cuda \\
        train.channels_last=true --steps 50 --warmup 10                                             # a GPU
    python benchmarks/sweep_time.py PLAN.yaml --only baseline_resnet32 dml_resnet32 --steps 3
"""

from __future__ import annotations

import argparse
import shlex
import sys

from okd.bench import EPOCH_IMAGES, bench, hardware_line
from okd.engine.builder import resolve_device
from okd.methods.build import load_config
from okd.report.sweep import with_recipe
from okd.report.sweep_file import load_sweep_file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plan", help="sweep file (benchmarks/sweeps/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every config (train.device=cuda)")
    p.add_argument("--only", nargs="+", metavar="TEXT", help="time only the runs whose description contains TEXT")
    p.add_argument("--steps", type=int, default=5, help="timed steps per config (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--csv", default=None, help="also append okd bench's rows to this CSV")
    args = p.parse_args(argv)

    plan = load_sweep_file(args.plan)
    common = with_recipe([*plan.overrides, *args.overrides], plan.recipe)
    entries = [e for e in plan.runs if not args.only or any(t in e.describe() for t in args.only)]
    seeds = max(len(plan.seeds), 1)
    print(f"sweep: {args.plan} (recipe {plan.recipe}, {len(plan.seeds)} seed(s)); {len(entries)} config(s) timed")
    print("| run | images/s | epochs | h per run | h for its seeds |\n|---|---|---|---|---|")
    total, device = 0.0, None
    for entry in entries:
        overrides = [*entry.overrides, *common]
        cfg = load_config(entry.config, overrides)
        device = resolve_device(cfg.run.train.device)
        command = shlex.join(["okd", "bench", entry.config, *overrides, "--steps", str(args.steps), "--no-reference"])
        report = bench(
            cfg,
            config_name=entry.config,
            steps=args.steps,
            warmup=args.warmup,
            windows=1,
            reference=False,
            synthetic=True,
            threads=args.threads,
            csv_path=args.csv,
            command=command,
        )
        speed = report.results[0].images_per_s
        images = EPOCH_IMAGES - cfg.run.data.holdout  # a CIFAR training split
        hours = cfg.run.train.epochs * images / speed / 3600
        total += hours * seeds
        print(f"| {entry.describe()} | {speed:.1f} | {cfg.run.train.epochs} | {hours:.1f} | {hours * seeds:.1f} |")
        sys.stdout.flush()
    if device is not None:
        print(f"\ntotal: {total:.1f} device-hours of training for the {len(entries)} config(s) timed x {seeds} seed(s)")
        print(f"hardware: {hardware_line(device)}; torch threads {args.threads or 'default'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
