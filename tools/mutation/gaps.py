"""``gaps``: the statements of each source file that none of its mapped test files executes.

A mutant on such a statement survives whatever it changes, so these are the first holes to close. Each mapped test
file runs once under ``coverage`` (its data kept in ``OUT/coverage/``, so a rerun into the same folder skips it);
then every source file's statements are compared with the lines its own test files executed. ``OUT/gaps.md`` lists
the statements left, file by file. Statements that run only in subprocesses (the torchrun tests) show up here
too: coverage does not follow them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from tools.mutation import ROOT
from tools.mutation.population import TESTS, resolve_files


def unexecuted(statements: set[int], executed: dict[str, set[int]], tests: list[str]) -> list[int]:
    """The statements (line numbers) that none of ``tests`` executed (``executed``: the lines each test file ran)."""
    ran = set().union(*(executed.get(t, set()) for t in tests))
    return sorted(statements - ran)


def data_file(out: Path, test: str) -> Path:
    return out / "coverage" / (test.replace("/", "_") + ".cov")


def measure(out: Path, tests: list[str]) -> None:
    """Run each test file under coverage (okd/ only) into its own data file; files measured before are kept."""
    for test in tests:
        path = data_file(out, test)
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "coverage", "run", f"--data-file={path}", "--include=okd/*"]
        cmd += ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"tests/{test}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        last = ([line for line in proc.stdout.splitlines() if line.strip()] or [""])[-1]
        print(f"coverage of {test}: {last}", flush=True)
        if proc.returncode != 0:
            path.unlink(missing_ok=True)
            raise SystemExit(f"tests/{test} failed unmutated; fix it first:\n{proc.stdout[-2000:]}")


def gaps(args: argparse.Namespace) -> None:
    try:
        import coverage  # an optional developer tool, not a dependency of okd
    except ImportError:
        raise SystemExit("gaps needs coverage: pip install coverage") from None
    out = Path(args.out)
    files = resolve_files(args.files)
    measure(out, sorted({t for f in files for t in TESTS[f]}))
    executed: dict[str, dict[str, set[int]]] = {f: {} for f in files}
    for test in sorted({t for f in files for t in TESTS[f]}):
        data = coverage.CoverageData(basename=str(data_file(out, test)))
        data.read()
        for f in files:
            executed[f][test] = set(data.lines(str(ROOT / f)) or [])
    lines_out, total = [], 0
    for f in files:
        _, statements, _, _, _ = coverage.Coverage(data_file=None).analysis2(str(ROOT / f))
        left = unexecuted(set(statements), executed[f], TESTS[f])
        total += len(left)
        if left:
            text = (ROOT / f).read_text(encoding="utf-8").splitlines()
            lines_out.append(f"## {f}: {len(left)} of {len(statements)} statements\n")
            lines_out += [f"- {n}: `{text[n - 1].strip()[:100]}`" for n in left]
            lines_out.append("")
    head = f"# Statements no mapped test executes: {total} over {len(files)} files\n"
    (out / "gaps.md").write_text("\n".join([head, *lines_out]), encoding="utf-8")
    print(f"{total} statements unexecuted by their mapped tests: {out / 'gaps.md'}")
