"""The README's first command, scripts/demo.sh: its okd train command resolves, and a one-step version of it runs
on real CIFAR-10 to the run's summary."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from okd.methods.build import load_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scripts" / "demo.sh"


def demo_command() -> list[str]:
    """The arguments of the demo's ``okd train`` line (shell continuation joined; its variables kept as written)."""
    text = DEMO.read_text(encoding="utf-8").replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith('exec "$PY" -m okd train '))
    return shlex.split(line)[5:]


def test_the_demo_command_resolves_to_the_run_the_readme_describes():
    args = demo_command()
    items = [a.replace("$precision", "bf16") for a in args if a != "$@" and not a.startswith(("name=", "data.root="))]
    assert items[0] == "cifar10/ffsd_resnet20"
    cfg = load_config(items[0], items[1:])
    run = cfg.run
    assert (cfg.method_name, run.model.name, run.data.dataset) == ("ffsd", "resnet20", "cifar10")
    assert (run.data.limit_train, run.data.limit_test, run.train.epochs, run.seed) == (20000, None, 2, 2)
    assert run.train.precision == "bf16"
    assert any(a.startswith("name=") for a in args) and args[-1] == "$@"


@pytest.mark.slow
def test_the_demo_script_runs_one_step_to_the_summary(cifar10_root, tmp_path):
    """scripts/demo.sh with OKD_CIFAR10 and the Python running this test (nothing installed), cut to one step."""
    env = {
        **os.environ,
        "OKD_PYTHON": sys.executable,
        "OKD_CIFAR10": str(cifar10_root),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cuts = ["train.epochs=1", "train.max_steps_per_epoch=1", "data.limit_train=256", "data.limit_test=100"]
    cmd = ["bash", str(DEMO), *cuts, f"output_dir={tmp_path}", "train.device=cpu", "train.progress=log"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "setup: installing" not in out  # an okd and torch that import are used as they are
    assert "ffsd / resnet20 / cifar10" in out and "deployed head: leader, top-1" in out, out
    (run,) = list(tmp_path.iterdir())
    assert run.name.startswith("demo-") and ":" not in run.name and (run / "deploy.pt").is_file()
