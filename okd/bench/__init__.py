"""``okd bench``: time a config's training step, side by side with the standard-recipe reference path.

Two paths run in the same process, on the same device and data:

- **okd**: the library's step (``okd.engine.step.StepRunner``) on the device-resident loader, with the config's
  precision / channels_last / compile switches, one backward of the summed loss dict, every optimizer stepped,
  loss sums accumulated on the device as the trainer does.
- **reference**: the standard recipe of the reference repositories: a ``torch.utils.data.DataLoader`` over a CPU
  dataset with per-sample transforms (pad, random crop, flip, normalise; written in torch), fp32, eager,
  contiguous layout, and one ``zero_grad -> backward -> step`` per cohort component in the loss dict's order
  (FFSD: students one by one, fusion, leader, SD modules; ``docs/methods.md#ffsd``, FFSD.5), with a ``.item()`` per
  component as the reference code's loss meters do.

Each path is built and runs ``warmup`` untimed steps (compile warm-up included there; its peak memory is measured
here), one path after the other; then ``steps`` timed steps per path, split into ``windows`` windows that alternate
between the paths (ABBA), and the reported images/s is each path's median over its windows. Timing: CUDA events
on a GPU, wall clock on the CPU; data loading is inside the timed region for both paths. FLOPs convention: the MACs
of every Conv2d / ConvTranspose2d / Linear call of one real ``training_step`` forward (all networks and auxiliary
modules, forward-only target passes included), per image; FLOPs = 2 x MACs x 3 (forward + backward).

Modules: ``data`` (split and loaders), ``macs`` (FLOPs convention), ``okd_path`` and ``reference`` (the two paths),
``timing`` (ABBA windows, results), ``syncs`` (``--check-syncs``), ``env`` (hardware line, commit, peak memory),
``rows`` (CSV), ``table`` (printed table), ``run`` (:func:`bench`), ``cli`` (``okd bench``).
"""

from okd.bench.cli import add_arguments, cmd_bench, command_line, main, register_cli
from okd.bench.data import ReferenceDataset, Split, load_split, okd_loader, reference_loader
from okd.bench.env import PeakMemory, git_commit, hardware_line
from okd.bench.macs import MacCount, cohort_macs, count_step_macs
from okd.bench.okd_path import build_optimizers
from okd.bench.reference import ReferenceStep, default_workers, graph_nodes
from okd.bench.rows import CSV_COLUMNS, FLOPS_NOTE, append_csv, check_csv
from okd.bench.run import bench
from okd.bench.table import format_table
from okd.bench.timing import EPOCH_IMAGES, BenchReport, PathResult, window_plan

__all__ = [
    "CSV_COLUMNS", "EPOCH_IMAGES", "FLOPS_NOTE", "BenchReport", "MacCount", "PathResult", "PeakMemory",
    "ReferenceDataset", "ReferenceStep", "Split", "add_arguments", "append_csv", "bench", "build_optimizers",
    "check_csv", "cmd_bench", "cohort_macs", "command_line", "count_step_macs", "default_workers", "format_table",
    "git_commit", "graph_nodes", "hardware_line", "load_split", "main", "okd_loader", "reference_loader",
    "register_cli", "window_plan",
]  # fmt: skip
