"""``summary.md`` and ``survivors.md`` of a run folder, from ``mutants.csv``, ``run.txt`` and ``triage.csv``."""

from __future__ import annotations

import csv
import platform
import subprocess
from pathlib import Path

from tools.mutation.operators import OPERATORS


def read_triage(folder: Path) -> dict[str, tuple[str, str]]:
    path = folder / "triage.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {row["id"]: (row["verdict"], row["reason"]) for row in csv.DictReader(f)}


def _environment() -> list[str]:
    import numpy
    import torch

    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()[:10]
    except OSError:
        cpu = [platform.processor()]
    return [
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
        f"pytest {_version('pytest')}, {platform.platform()}",
        *cpu,
    ]


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "?"


def report(folder: Path) -> None:
    """summary.md and survivors.md of a run folder, from mutants.csv, run.txt and triage.csv."""
    folder = Path(folder)
    with open(folder / "mutants.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    triage = read_triage(folder)
    meta = (folder / "run.txt").read_text(encoding="utf-8") if (folder / "run.txt").is_file() else ""

    def counts(selected: list[dict]) -> tuple[int, int, int, int, int]:
        n = len(selected)
        killed = sum(r["status"] == "killed" for r in selected)
        timeout = sum(r["status"] == "timeout" for r in selected)
        survived = [r for r in selected if r["status"] == "survived"]
        equivalent = sum(triage.get(r["id"], ("", ""))[0] == "equivalent" for r in survived)
        return n, killed, timeout, len(survived), equivalent

    def rates(n, killed, timeout, survived, equivalent) -> str:
        raw = 100 * (killed + timeout) / n if n else 0.0
        non_eq = n - equivalent
        kept = 100 * (killed + timeout) / non_eq if non_eq else 0.0
        return f"| {n} | {killed} | {timeout} | {survived} | {equivalent} | {raw:.1f} % | {kept:.1f} % |"

    head = "| | mutants | killed | timeout | survived | of which equivalent | killed, raw | killed, non-equivalent |"
    rule = "|---|---|---|---|---|---|---|---|"
    lines = ["# Mutation run", "", "```", meta.rstrip(), "```", "", head, rule]
    lines.append("| **all** " + rates(*counts(rows)))
    lines += ["", "## By operator", "", head, rule]
    for op in OPERATORS:
        sel = [r for r in rows if r["operator"] == op]
        if sel:
            lines.append(f"| {op} " + rates(*counts(sel)))
    lines += ["", "## By file", "", head, rule]
    for f in sorted({r["file"] for r in rows}):
        lines.append(f"| `{f}` " + rates(*counts([r for r in rows if r["file"] == f])))
    lines += ["", "## Environment", "", "```", *_environment(), "```", ""]
    (folder / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    survivors = ["# Surviving mutants", "", "| id | change | verdict | reason |", "|---|---|---|---|"]
    for r in rows:
        if r["status"] == "survived":
            verdict, reason = triage.get(r["id"], ("untriaged", ""))
            survivors.append(f"| `{r['id']}` | `{r['change']}` | {verdict} | {reason} |")
    (folder / "survivors.md").write_text("\n".join(survivors) + "\n", encoding="utf-8")
    print((folder / "summary.md").read_text(encoding="utf-8").split("## By operator")[0])
