"""``okd sweep --launcher slurm|local``: one submitit job per config and seed, each resuming after a requeue.

Each job trains its run in-process (:class:`TrainJob`); a job whose run folder already holds ``last.pt``
resumes it (a finished run is left as it is). When SLURM pre-empts a job or its time runs out, submitit calls
:meth:`TrainJob.checkpoint`, which requeues the same job on the same run folder: it continues from the last
finished epoch, as ``okd train --resume`` does. ``slurm`` submits an array (``--array-parallelism`` jobs at
once) and returns; ``local`` runs the same jobs as local processes through submitit's LocalExecutor and
waits for them (for trying a sweep without a cluster). Needs the optional extra ``pip install "okd[slurm]"``
(submitit); ``okd sweep`` says so when it is missing.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from okd.engine import trainer
from okd.engine.run_log import format_duration
from okd.engine.trainer import run_dir_for
from okd.errors import ConfigError, OKDError
from okd.methods.build import load_config
from okd.report.sweep import Configs, sweep_plan

LAUNCHERS = ("slurm", "local")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's LocalExecutor kills a job after 2 minutes unless told otherwise
PREEMPT_WAIT_S = 120  # how long a job stopped by SIGTERM on SLURM waits for submitit's requeue signal


@dataclass
class ClusterOptions:
    """What ``okd sweep`` asks of the cluster for every job (None: the cluster's default)."""

    partition: str | None = None
    time_min: int | None = None  # wall-time limit per job, minutes (required on SLURM)
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    array_parallelism: int | None = None  # SLURM: jobs of the array running at once
    job_dir: str | None = None  # submitit's folder (scripts, logs, pickles); default <output_dir>/submitit

    def validate(self, launcher: str) -> None:
        if launcher not in LAUNCHERS:
            raise ConfigError(f"unknown launcher {launcher!r}; choose one of: {', '.join(LAUNCHERS)}")
        for name in ("time_min", "gpus_per_node", "cpus_per_task", "array_parallelism"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "gpus_per_node" else 1):
                raise ConfigError(f"--{name.replace('_min', '').replace('_', '-')} must be positive, got {value}")
        if launcher == "slurm" and self.time_min is None:
            raise ConfigError(
                "okd sweep --launcher slurm needs --time MINUTES, each job's wall-time limit (submitit's default "
                "is 5 minutes); a job that reaches it is requeued and resumes its run folder"
            )


def executor_parameters(opts: ClusterOptions, launcher: str) -> dict:
    """The ``AutoExecutor.update_parameters`` keywords for ``opts`` (slurm_* keys apply on SLURM only)."""
    params: dict = {"name": "okd-sweep"}
    timeout = opts.time_min if opts.time_min is not None else (LOCAL_TIMEOUT_MIN if launcher == "local" else None)
    for key, value in (
        ("timeout_min", timeout),
        ("gpus_per_node", opts.gpus_per_node),
        ("cpus_per_task", opts.cpus_per_task),
        ("slurm_partition", opts.partition),
        ("slurm_array_parallelism", opts.array_parallelism),
    ):
        if value is not None:
            params[key] = value
    return params


class TrainJob(Checkpointable):
    """One run of a sweep as a submitit job: trains ``config`` with ``overrides`` into ``run_dir``."""

    def __init__(self, config: str, overrides: list[str], run_dir: str) -> None:
        self.config, self.overrides, self.run_dir = str(config), list(overrides), str(run_dir)

    def __call__(self) -> str:
        run_dir = Path(self.run_dir)
        resume = (run_dir / "last.pt").exists()
        print(f"okd sweep job: {self.config} -> {run_dir}{' (resuming)' if resume else ''}", flush=True)
        try:
            return str(trainer.train(load_config(self.config, self.overrides), run_dir=run_dir, resume=resume))
        except KeyboardInterrupt:
            if "SLURM_JOB_ID" not in os.environ:
                raise
            # SLURM signals a pre-emption with SIGTERM, which the trainer turns into a stop (last.pt keeps the
            # last finished epoch); submitit's own signal follows and requeues this job: wait for it.
            print(f"okd sweep job: stopped; waiting up to {PREEMPT_WAIT_S} s for submitit's requeue", flush=True)
            time.sleep(PREEMPT_WAIT_S)
            raise

    def checkpoint(self, *args, **kwargs):
        """Pre-empted or out of time: requeue this job on the same run folder; it resumes from ``last.pt``."""
        return DelayedSubmission(TrainJob(self.config, self.overrides, self.run_dir))


def _executor(launcher: str, folder: Path, opts: ClusterOptions) -> submitit.AutoExecutor:
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=launcher)
    except RuntimeError as exc:  # no srun on this machine
        raise OKDError(f"cannot submit to SLURM from here ({exc}); --launcher local runs the jobs here") from None
    executor.update_parameters(**executor_parameters(opts, launcher))
    return executor


def launch_sweep(
    configs: Configs,
    seeds: list[int],
    overrides: list[str] = (),
    launcher: str = "slurm",
    opts: ClusterOptions | None = None,
) -> list[tuple[str, Path]]:
    """Submit one job per config and seed; returns ``(job id, run folder)`` pairs. ``local`` waits for every
    job, printing a line as each one ends, and raises if one fails; ``slurm`` returns once the array is queued."""
    opts = opts or ClusterOptions()
    opts.validate(launcher)
    plan = sweep_plan(configs, seeds, overrides)

    jobs = [TrainJob(config, items, str(run_dir_for(cfg))) for config, _, items, cfg in plan]
    folder = Path(opts.job_dir) if opts.job_dir else Path(plan[0][3].run.output_dir) / "submitit"
    executor = _executor(launcher, folder / "%j", opts)
    with executor.batch():
        submitted = [executor.submit(job) for job in jobs]
    pairs = [(str(s.job_id), Path(j.run_dir)) for s, j in zip(submitted, jobs, strict=True)]
    failed = wait_local(submitted, dict(pairs), folder) if launcher == "local" else []
    with contextlib.suppress(OSError):  # submitit makes a folder named by the pattern itself: removed when empty
        (folder / "%j").rmdir()
    if launcher == "local":
        if failed:
            raise OKDError(f"{len(failed)} sweep job(s) failed; logs in {folder}: " + "; ".join(failed))
    return pairs


def wait_local(submitted: list, run_dirs: dict[str, Path], folder: Path) -> list[str]:
    """Wait for the local jobs, printing a line as each one ends (in the order they end); returns the failures."""
    print(f"okd sweep: {len(submitted)} job(s) running here; their logs: {folder}", flush=True)
    failed: list[str] = []
    started = time.perf_counter()
    for done, job in enumerate(submitted_as_completed(submitted), 1):
        run_dir = run_dirs[str(job.job_id)]
        try:
            job.result()
            outcome = "finished"
        except Exception as exc:  # submitit re-raises the job's error with its traceback
            outcome = f"FAILED: {str(exc).strip().splitlines()[-1]}"
            failed.append(f"{run_dir} (job {job.job_id}): {str(exc).strip().splitlines()[-1]}")
        elapsed = format_duration(time.perf_counter() - started)
        print(f"okd sweep: [{done}/{len(submitted)}] {elapsed} job {job.job_id} {outcome} -> {run_dir}", flush=True)
    return failed


def submitted_as_completed(submitted: list):
    """The jobs in the order they end (submitit's ``as_completed``, polled every second)."""
    return submitit.helpers.as_completed(submitted, poll_frequency=1.0)
