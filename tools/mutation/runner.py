"""``run``: the unmutated baselines, then each mutant against its test files, into ``OUT/``."""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import Counter
from pathlib import Path

from tools.mutation.operators import mutants_of
from tools.mutation.population import parse_mix, read_ids, resolve_files, resolve_guards, sample, tests_of
from tools.mutation.report import report
from tools.mutation.sandbox import Sandbox

FIELDS = ["id", "file", "line", "operator", "change", "status", "seconds", "tests", "detail"]


def run(args: argparse.Namespace) -> None:
    files = resolve_files(args.files)
    mix = parse_mix(args.mix)
    if args.operators:
        mix = {op: mix.get(op, 1.0) for op in args.operators.split(",")}
    promises: dict[str, str] = {}
    if args.guards:
        promises = resolve_guards(Path(args.guards))
        args.ids = ",".join(promises)
    if args.ids:
        wanted = read_ids(args.ids)
        files = sorted({i.split(":")[0] for i in wanted})
        every = [m for f in files for m in mutants_of(f) if m.id in wanted]
        missing = sorted(set(wanted) - {m.id for m in every})
        if missing:
            raise SystemExit(f"no such mutants (the source moved? `list` shows today's ids): {', '.join(missing)}")
        chosen = every
    else:
        every = [m for f in files for m in mutants_of(f) if m.operator in mix]
        chosen = sample(every, args.total, mix, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(every)} mutants over {len(files)} files; running {len(chosen)} (seed {args.seed})", flush=True)
    box = Sandbox(keep=args.keep)
    rows: list[dict] = []
    started = time.time()
    try:
        baseline = baselines(box, sorted({t for m in chosen for t in tests_of(m.file)}), out, args.max_baseline)
        for i, m in enumerate(chosen, 1):
            tests = tests_of(m.file)
            target = box.repo / m.file
            original = target.read_text(encoding="utf-8")
            limit = args.timeout_factor * sum(baseline[t] for t in tests) + args.timeout_extra
            try:
                target.write_text(m.source, encoding="utf-8")
                status, secs, last = box.pytest(tests, timeout=limit)
            finally:
                target.write_text(original, encoding="utf-8")
            verdict = {"failed": "killed", "passed": "survived", "timeout": "timeout"}[status]
            rows.append(
                {
                    "id": m.id, "file": m.file, "line": m.line, "operator": m.operator, "change": m.change,
                    "status": verdict, "seconds": f"{secs:.1f}", "tests": " ".join(tests), "detail": last[:160],
                }
            )  # fmt: skip
            print(f"[{i}/{len(chosen)}] {verdict:8s} {m.id}  {m.change}", flush=True)
            write_csv(out / "mutants.csv", rows)
    finally:
        box.close()
    meta = {
        "command": " ".join(["python", "-m", "tools.mutation", *sys.argv[1:]]),
        "seed": "none" if args.ids else args.seed,
        "mix": "none: the listed mutants, no sampling" if args.ids else mix,
        "population": dict(Counter(m.operator for m in every)),
        "files": files,
        "wall_s": time.time() - started,
    }
    write_meta(out / "run.txt", meta)
    if promises:
        write_guards(out / "guards.md", promises, rows)
    report(out)


def write_guards(path: Path, promises: dict[str, str], rows: list[dict]) -> None:
    status = {r["id"]: r["status"] for r in rows}
    change = {r["id"]: r["change"] for r in rows}
    lines = ["# The guards behind the README's promises", "", "| promise | mutant | change | status |"]
    lines.append("|---|---|---|---|")
    for mid, promise in promises.items():
        lines.append(f"| {promise} | `{mid}` | `{change.get(mid, '')}` | {status.get(mid, 'not run')} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def baselines(box: Sandbox, tests: list[str], out: Path, limit: float) -> dict[str, float]:
    """Seconds of each unmutated test file (which must pass), kept in ``OUT/baseline.csv`` for a rerun."""
    path = out / "baseline.csv"
    known: dict[str, float] = {}
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            known = {row["tests"]: float(row["seconds"]) for row in csv.DictReader(f)}
    for t in tests:
        if t in known:
            continue
        status, secs, last = box.pytest([t], timeout=limit)
        if status != "passed":
            raise SystemExit(f"the unmutated {t} does not pass ({status}): {last}")
        known[t] = secs
        print(f"baseline {t}: {secs:.1f} s", flush=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["tests", "seconds"])
            writer.writerows(sorted(known.items()))
    return known


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def write_meta(path: Path, meta: dict) -> None:
    lines = [f"{k}: {v}" for k, v in meta.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
