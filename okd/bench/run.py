"""One ``okd bench`` run: build and warm up the paths, time their windows, make the rows."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import torch

from okd.bench.data import load_split
from okd.bench.macs import cohort_macs
from okd.bench.okd_path import start_okd
from okd.bench.reference import default_workers, start_reference
from okd.bench.rows import append_csv, check_csv, make_row
from okd.bench.syncs import count_syncs
from okd.bench.timing import BenchReport, window_plan
from okd.config import Config
from okd.engine.builder import resolve_device
from okd.errors import OKDError
from okd.models.members import cohort_label


def bench(
    cfg: Config,
    *,
    config_name: str = "",
    steps: int = 20,
    warmup: int = 5,
    windows: int = 5,
    reference: bool = True,
    workers: int | None = None,
    synthetic: bool = False,
    check_syncs: bool = False,
    also_eager: bool = False,
    threads: int | None = None,
    csv_path: str | Path | None = None,
    command: str | None = None,
) -> BenchReport:
    """Time the okd path (and, with ``reference``, the reference path) of ``cfg``; with ``csv_path``, append the
    rows there (nothing is written without it).

    Both paths are built and warmed up one after the other (each one's peak memory is the growth over its own
    start), then their timed windows alternate; each path's images/s is the median over its windows.
    ``threads`` sets ``torch.set_num_threads`` for the run (restored afterwards). ``also_eager`` (with
    ``train.compile=true``): a third path, ``okd-eager``, times the same okd step uncompiled in the same windows,
    so that the compiled/eager ratio comes from one run.
    """
    if steps <= 0 or warmup < 0 or windows <= 0:
        raise OKDError(f"--steps and --windows must be positive, --warmup >= 0 (got {steps}, {windows}, {warmup})")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench(cfg, config_name, steps, warmup, windows, reference, workers, synthetic, check_syncs, csv_path,
                      command, also_eager)  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)


def _bench(cfg, config_name, steps, warmup, windows, reference, workers, synthetic, check_syncs, csv_path, command,
           also_eager=False):  # fmt: skip

    if csv_path is not None:
        check_csv(csv_path)  # fail before the run, not after it (an empty path is refused there)
    device = resolve_device(cfg.run.train.device)
    batch = cfg.run.data.batch_size
    workers = default_workers(device) if workers is None else workers
    split = load_split(cfg, min_images=batch * (warmup + steps + 2), synthetic=synthetic)
    macs = cohort_macs(cfg, split, device)
    model = cohort_label(cfg.to_dict()["model"])  # a cohort of different networks: its members joined by +
    report = BenchReport(config_name, cfg.method_name, model, batch, device, macs, split)
    if also_eager and not cfg.run.train.compile:
        raise OKDError("--also-eager times the uncompiled step next to the compiled one: add train.compile=true")
    paths = [start_okd(cfg, split, device, warmup)]
    if also_eager:
        paths.append(start_okd(_uncompiled(cfg), split, device, warmup, name="okd-eager"))
    if reference:
        paths.append(start_reference(cfg, split, device, warmup, workers))
    for index, size in window_plan(steps, windows, len(paths)):
        paths[index].timed_window(size, device)
    if check_syncs:
        paths[0].syncs = count_syncs(paths[0], device)
    report.results = [p.result(steps) for p in paths]
    del paths  # stops the reference DataLoader's workers
    gc.collect()
    command = command or _default_command(config_name, steps, warmup, reference, csv_path)
    report.rows = [make_row(report, r, command) for r in report.results]
    if csv_path is not None:
        append_csv(report.rows, csv_path)
    return report


def _uncompiled(cfg: Config) -> Config:
    train = dataclasses.replace(cfg.run.train, compile=False)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, train=train))


def _default_command(config_name: str, steps: int, warmup: int, reference: bool, csv_path) -> str:
    ref = "" if reference else " --no-reference"
    out = f" --csv {csv_path}" if csv_path is not None else ""
    return f"okd bench {config_name} --steps {steps} --warmup {warmup}{ref}{out}".strip()
