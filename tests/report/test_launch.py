"""okd sweep --launcher: one submitit job per config and seed, through the local executor and a stand-in SLURM."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import helpers
import pytest

from okd.errors import ConfigError, OKDError
from okd.runs.metrics import read_metrics_csv

pytest.importorskip("submitit")

CONFIG = "cifar10/baseline_resnet20"


def tiny(root: Path, out: Path) -> list[str]:
    return [
        f"data.root={root}",
        "data.download=false",
        "data.limit_train=64",
        "data.limit_test=32",
        "data.batch_size=16",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "train.progress=none",
        f"output_dir={out}",
        "name=tiny",
    ]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, cifar10_root) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("launch")
    text = helpers.cli(
        "sweep", CONFIG, *tiny(cifar10_root, out), "--seeds", "1", "2", "--launcher", "local", "--time", "20"
    )
    return text, out


@pytest.mark.slow
def test_local_launcher_runs_two_seeds_through_submitit(local_sweep):
    text, out = local_sweep
    assert "ran 2 job(s) through submitit (local):" in text
    for seed in (1, 2):
        run = out / f"tiny_s{seed}"
        assert f"-> {run}" in text
        assert (run / "deploy.pt").is_file() and (run / "last.pt").is_file()
        assert [row["epoch"] for row in read_metrics_csv(run / "metrics.csv")] == [1]
    assert f"summary: okd report {out / 'tiny_s1'} {out / 'tiny_s2'}" in text
    logs = list((out / "submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and all("okd sweep job:" in p.read_text() for p in logs)  # each ran in its own job
    assert not (out / "submitit" / "%j").exists()  # no folder named after submitit's pattern is left


def test_local_launcher_prints_each_job_as_it_ends(local_sweep):
    text, out = local_sweep
    lines = text.splitlines()
    assert lines[0] == f"okd sweep: 2 job(s) running here; their logs: {out / 'submitit'}"
    ended = [line for line in lines if line.startswith("okd sweep: [")]
    assert [line.split("]")[0] for line in ended] == ["okd sweep: [1/2", "okd sweep: [2/2"]
    assert all(" finished -> " in line for line in ended)
    assert {line.rsplit("-> ", 1)[1] for line in ended} == {str(out / "tiny_s1"), str(out / "tiny_s2")}
    assert lines.index(ended[-1]) < lines.index("ran 2 job(s) through submitit (local):")  # before the summary


def test_requeued_job_resumes_its_run_folder(local_sweep, capsys):
    from okd.report.launch import TrainJob

    _, out = local_sweep
    run = out / "tiny_s1"
    pickles = [pickle.loads(p.read_bytes()).function for p in (out / "submitit").glob("*/*_submitted.pkl")]
    (job,) = [j for j in pickles if j.run_dir == str(run)]
    assert isinstance(job, TrainJob) and "seed=1" in job.overrides
    requeued = job.checkpoint()  # what submitit resubmits when SLURM pre-empts the job or its time runs out
    again = requeued.function
    assert again is not job and (again.config, again.overrides, again.run_dir) == (
        job.config,
        job.overrides,
        job.run_dir,
    )
    before = (run / "last.pt").stat().st_mtime_ns
    mine = again
    assert mine() == str(run)
    assert f"-> {run} (resuming)" in capsys.readouterr().out
    assert (run / "last.pt").stat().st_mtime_ns == before  # a finished run is left as it is


def _fake_slurm(bin_dir: Path, log: Path) -> None:
    """``srun`` (so submitit sees a cluster) and an ``sbatch`` that keeps the script and answers a job id."""
    bin_dir.mkdir()
    scripts = {
        "srun": "#!/bin/sh\nexit 0\n",
        "sbatch": f'#!/bin/sh\ncp "$1" "{log}"\necho "Submitted batch job 4242"\n',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_launcher_submits_one_array_job_per_config_and_seed(tmp_path, monkeypatch):
    script = tmp_path / "submitted.sh"
    _fake_slurm(tmp_path / "bin", script)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    configs = [CONFIG, "cifar10/ffsd_resnet20"]
    text = helpers.cli(
        "sweep", *configs, f"output_dir={tmp_path / 'runs'}", "--seeds", "1", "2", "--launcher", "slurm",
        "--partition", "gpu", "--time", "90", "--gpus-per-node", "1", "--cpus-per-task", "4",
        "--array-parallelism", "3",
    )  # fmt: skip
    assert "submitted 4 job(s) through submitit (slurm):" in text
    for i, name in enumerate(["cifar10_baseline_resnet20_s1", "cifar10_baseline_resnet20_s2",
                              "cifar10_ffsd_resnet20_s1", "cifar10_ffsd_resnet20_s2"]):  # fmt: skip
        assert f"job 4242_{i} -> {tmp_path / 'runs' / name}" in text
    sbatch = script.read_text()
    for line in ("--partition=gpu", "--time=90", "--gpus-per-node=1", "--cpus-per-task=4", "--array=0-3%3"):
        assert f"#SBATCH {line}\n" in sbatch, line
    assert "#SBATCH --signal=USR2@" in sbatch  # submitit's warning before the time limit: checkpoint, requeue


def test_launcher_options_are_checked(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="needs --time MINUTES"):
        helpers.cli("sweep", CONFIG, f"output_dir={tmp_path}", "--seeds", "1", "--launcher", "slurm")
    with pytest.raises(ConfigError, match="--partition only apply with --launcher"):
        helpers.cli("sweep", CONFIG, "--seeds", "1", "--partition", "gpu", "--print")
    with pytest.raises(ConfigError, match="exclude each other"):
        helpers.cli("sweep", CONFIG, "--seeds", "1", "--launcher", "local", "--print")
    with pytest.raises(ConfigError, match="the same folders"):
        helpers.cli("sweep", CONFIG, "cifar10/ffsd_resnet20", "name=x", "--seeds", "1", "--print")
    with pytest.raises(ConfigError, match="same run folder"):
        helpers.cli("sweep", CONFIG, CONFIG, "--seeds", "1", "--print")
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    with pytest.raises(OKDError, match="cannot submit to SLURM from here"):
        helpers.cli("sweep", CONFIG, f"output_dir={tmp_path}", "--seeds", "1", "--launcher", "slurm", "--time", "5")


def test_a_job_stopped_on_slurm_waits_for_submitits_requeue(monkeypatch):
    import signal
    import threading

    from okd.engine import trainer
    from okd.report import launch

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # what the trainer raises on SIGTERM

    monkeypatch.setattr(trainer, "train", stopped)
    monkeypatch.setattr(launch, "PREEMPT_WAIT_S", 30)
    job = launch.TrainJob(CONFIG, [], "/nonexistent/run")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(KeyboardInterrupt):
        job()  # not on SLURM: the stop is the user's
    monkeypatch.setenv("SLURM_JOB_ID", "4242")

    def requeue(signum, frame):  # stands in for submitit's handler: checkpoint, requeue, exit
        raise SystemExit("requeued")

    old = signal.signal(signal.SIGUSR2, requeue)
    try:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR2)).start()
        with pytest.raises(SystemExit, match="requeued"):
            job()
    finally:
        signal.signal(signal.SIGUSR2, old)
