"""The private copy of the repository the mutants are written into, and ``pytest`` run in it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.mutation import ROOT

#: run in the sandbox before anything else: an editable install of okd (a meta-path finder mapping ``okd`` to
#: another checkout) would otherwise serve any module missing from the copy, silently, from that checkout
SITECUSTOMIZE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
"""


def _default_signals() -> None:
    """In the test process, SIGINT and SIGTERM as in a terminal: a tool started in the background (``cmd &``)
    passes SIGINT on ignored, and the tests of held signals would then see nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _not_copied(folder: str, names: list[str]) -> set[str]:
    """What the sandbox copy leaves out: VCS data, caches, and run folders at the repository root."""
    skip = {n for n in names if n in (".git", "__pycache__", ".pytest_cache", ".ruff_cache") or n.endswith(".pyc")}
    if Path(folder) == ROOT:
        skip |= {n for n in names if n in ("runs", ".venv", ".ci-venv", ".ci-venv-timm", "build", "dist")}
    return skip


class Sandbox:
    """A private copy of the repository (tracked and untracked files, no .git/caches) the mutants are written
    into, and the real CIFAR-10 subset the end-to-end tests read, made once."""

    def __init__(self, keep: bool = False) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="okd-mutation-"))
        self.repo = self.base / "repo"
        shutil.copytree(ROOT, self.repo, ignore=_not_copied)
        self.keep = keep
        site = self.base / "site"  # sitecustomize: okd is imported from the copy only
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(self.repo), str(site)]),
            "PYTHONDONTWRITEBYTECODE": "1",  # a mutant and the original may share a size and an mtime second
            "OKD_CIFAR10": self._cifar10(),
        }
        probe = "import okd.runs.store, okd.configs; print(okd.runs.store.__file__, *okd.configs.__path__)"
        run = subprocess.run([sys.executable, "-c", probe], cwd=self.repo, env=self.env, capture_output=True, text=True)
        where = run.stdout
        if not where.split() or not all(p.startswith(str(self.repo)) for p in where.split()):
            raise SystemExit(f"the sandbox imports okd from outside its copy ({where.strip()!r}); see SITECUSTOMIZE")

    def _cifar10(self) -> str:
        if os.environ.get("OKD_CIFAR10"):
            return os.environ["OKD_CIFAR10"]
        shared = ROOT.parent / "shared" / "data"
        out = self.base / "cifar10"
        script = shared / "make_cifar10.py"
        if script.is_file():
            subprocess.run(
                [sys.executable, str(script), str(out), "--limit-train", "2000", "--limit-test", "500"],
                check=True,
                capture_output=True,
            )
            return str(out)
        return ""

    def pytest(self, tests: list[str], timeout: float) -> tuple[str, float, str]:
        """``pytest -x -q`` of ``tests`` in the copy: (passed | failed | timeout, seconds, last line)."""
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=self.repo, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, preexec_fn=_default_signals,
        )  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return "timeout", time.perf_counter() - start, ""
        lines = [line for line in out.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        return ("passed" if proc.returncode == 0 else "failed"), time.perf_counter() - start, last

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)
