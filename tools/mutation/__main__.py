"""The command line: ``python -m tools.mutation list|show|run|gaps|report`` (see ``docs/development.md``)."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections import Counter
from pathlib import Path

from tools.mutation import ROOT
from tools.mutation import __doc__ as DOC
from tools.mutation.gaps import gaps
from tools.mutation.operators import mutants_of
from tools.mutation.population import resolve_files
from tools.mutation.report import report
from tools.mutation.runner import run


def list_mutants(args: argparse.Namespace) -> None:
    for f in resolve_files(args.files):
        ms = mutants_of(f)
        for m in ms:
            if not args.operators or m.operator in args.operators.split(","):
                print(f"{m.id}\t{m.change}")
        print(f"# {f}: {len(ms)} mutants {dict(Counter(m.operator for m in ms))}", file=sys.stderr)


def show(args: argparse.Namespace) -> None:
    """The diff of one mutant (by id)."""
    file = args.id.split(":")[0]
    for m in mutants_of(file):
        if m.id == args.id:
            original = (ROOT / file).read_text(encoding="utf-8").splitlines(keepends=True)
            sys.stdout.writelines(difflib.unified_diff(original, m.source.splitlines(keepends=True), file, file))
            return
    raise SystemExit(f"no mutant {args.id}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.mutation", description=DOC.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="print every mutant of the files")
    p.add_argument("files", nargs="+", help="source files, folders under okd/, or 'core'")
    p.add_argument("--operators", help="comma-separated operators (default: all)")
    p.set_defaults(func=list_mutants)
    p = sub.add_parser("show", help="the diff of one mutant")
    p.add_argument("id")
    p.set_defaults(func=show)
    p = sub.add_parser("run", help="run a seeded sample of mutants against their tests")
    p.add_argument("--files", nargs="+", default=["core"], help="source files, folders under okd/, or 'core'")
    p.add_argument("--total", type=int, help="mutants to run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", help="operator weights, e.g. delete=3,compare=1 (default: DEFAULT_MIX)")
    p.add_argument("--operators", help="only these operators (comma-separated)")
    p.add_argument("--ids", help="run exactly these mutants: a file of ids (one a line) or a comma-separated list")
    p.add_argument("--guards", help="run the mutants a guards file names (see resolve_guards), with guards.md")
    p.add_argument("--out", required=True, help="folder for mutants.csv, summary.md, survivors.md")
    p.add_argument("--timeout-factor", type=float, default=3.0, help="a mutant's limit: factor x baseline + extra")
    p.add_argument("--timeout-extra", type=float, default=20.0)
    p.add_argument("--max-baseline", type=float, default=1800.0, help="limit of an unmutated run (s)")
    p.add_argument("--keep", action="store_true", help="keep the sandbox copy")
    p.set_defaults(func=run)
    p = sub.add_parser("gaps", help="statements no mapped test file executes (needs coverage): OUT/gaps.md")
    p.add_argument("--files", nargs="+", default=["core"], help="source files, folders under okd/, or 'core'")
    p.add_argument("--out", required=True, help="folder for gaps.md and the coverage data of each test file")
    p.set_defaults(func=gaps)
    p = sub.add_parser("report", help="summary.md and survivors.md again (after editing triage.csv)")
    p.add_argument("folder")
    p.set_defaults(func=lambda a: report(Path(a.folder)))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
