"""GPU evidence in one command: smoke, speed and accuracy of okd on one GPU, every result under one folder.

    python benchmarks/gpu_check.py OUT [--dry-run] [--data CIFAR10_DIR] [--work DIR]

Sections, each in its own process with its own time budget (``BUDGET_S``; ``--dry-run``: ``DRY_BUDGET_S``), so
that the whole run ends within 9 minutes on one H100/H200 and a section stopped at its budget keeps what it
wrote (results are appended item by item):

- **env**: the hardware line (``nvidia-smi``, ``torch.cuda.get_device_name``), versions, commit -> ``env.json``;
- **speed** (alone on the GPU): ``okd bench`` of baseline, DML, ONE, OKDDip and FFSD on ResNet-32 and WRN-16-2
  (CIFAR-100 configs, synthetic CIFAR-shaped data, batch 128), bf16 and fp32, eager with the reference path in
  the same process and compiled (``compile_mode=reduce-overhead``), ``--check-syncs`` on every okd step, in
  priority order (FFSD and baseline ResNet-32 first) -> ``speed.csv`` (bench rows), ``speed_items.json``;
- **accuracy** (in the background, while smoke runs): a short CIFAR-10 schedule (full 50k, ``ACCURACY_EPOCHS``
  epochs, lr x0.1 at 50 % and 75 %) of baseline, DML and FFSD on ResNet-20 and ResNet-32, bf16 and fp32, all runs
  at once on the one GPU; final and best top-1 of every head -> ``accuracy.csv`` (partial epochs count);
- **smoke**: every registered method on the device for a few steps, evaluated with every head, a checkpoint
  and a resume, fp32 and bf16; the resumed run must equal a straight run bitwise -> ``smoke.csv``.

The driver writes ``summary.json`` / ``summary.md`` and ``gpu_check.log`` (8 files at most under OUT; run folders
go to ``--work``). ``--dry-run`` runs the same sections on the CPU with tiny step counts (a few minutes; what it
leaves out is said in ``DRY``). ``gpu_check_plan.py`` holds the budgets, the items of each section and shared
helpers; ``gpu_check_sections.py`` the sections; this file the driver, the summary and ``--verify``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check_plan, gpu_check_sections
from gpu_check_plan import (  # noqa: E402
    BUDGET_S,
    DRY_BUDGET_S,
    REPO,
    SECTIONS,
    cifar10_root,
    failed_smoke,
    missing_outputs,
    now,
    read_csv,
)
from gpu_check_sections import section_accuracy, section_env, section_smoke, section_speed  # noqa: E402


# ------------------------------------------------------------------------------------------------- driver
def run_section(name: str, out: Path, args, budget: float, log) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), str(out), "--section", name, "--budget", str(budget)]
    cmd += (
        ["--work", args.work] + (["--dry-run"] if args.dry_run else []) + (["--data", args.data] if args.data else [])
    )
    log.write(f"\n===== {name} (budget {budget:.0f} s) {now()}\n")
    log.flush()
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def finish(proc: subprocess.Popen, budget: float, started: float) -> str:
    """Wait for a section up to its budget (+ grace), then stop its whole process group."""
    try:
        rc = proc.wait(timeout=max(1.0, budget + 10 - (time.monotonic() - started)))
        return "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "stopped at its budget"


def drive(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    budgets = DRY_BUDGET_S if args.dry_run else BUDGET_S
    if args.data:  # decode once here rather than in two sections at the same time
        args.data = str(cifar10_root(args.data, Path(args.work), args.dry_run))
    t0 = time.monotonic()
    sections: dict[str, dict] = {}
    with open(out / "gpu_check.log", "a") as log:
        for name in ("env", "speed"):
            start = time.monotonic()
            status = finish(run_section(name, out, args, budgets[name], log), budgets[name], start)
            sections[name] = {"status": status, "seconds": round(time.monotonic() - start, 1)}
        start = time.monotonic()
        accuracy = run_section("accuracy", out, args, budgets["accuracy"], log)
        smoke = run_section("smoke", out, args, budgets["smoke"], log)
        sections["smoke"] = {"status": finish(smoke, budgets["smoke"], start)}
        sections["smoke"]["seconds"] = round(time.monotonic() - start, 1)
        sections["accuracy"] = {"status": finish(accuracy, budgets["accuracy"], start)}
        sections["accuracy"]["seconds"] = round(time.monotonic() - start, 1)
    summary = write_summary(out, sections, time.monotonic() - t0, budgets)
    print(summary)
    return 1 if any(s["status"].startswith("failed") for s in sections.values()) else 0  # budget stops keep results


def write_summary(out: Path, sections: dict, seconds: float, budgets: dict) -> str:
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    lines = [
        f"# gpu_check {env.get('date', now())}{' (dry run, CPU)' if env.get('dry_run') else ''}",
        "",
        f"hardware: {env.get('hardware', '?')}; nvidia-smi: {env.get('nvidia_smi') or '-'}",
        f"torch {env.get('torch', '?')} (CUDA {env.get('cuda') or '-'}), python {env.get('python', '?')}, "
        f"commit {env.get('commit', '?')}; total {seconds:.0f} s",
        "",
        "| section | status | seconds | budget |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {s['status']} | {s['seconds']} | {budgets[n]} |" for n, s in sections.items()]
    items = json.loads((out / "speed_items.json").read_text()) if (out / "speed_items.json").exists() else []
    lines += [
        "",
        "## speed (images/s; okd vs reference in the same process)",
        "",
        "| method | model | precision | compiled | okd | reference | okd/ref | syncs | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for it in items:
        ips = it.get("images_per_s", {})
        okd, ref = ips.get("okd"), ips.get("reference")
        ratio = f"{okd / ref:.2f}x" if okd and ref else "-"
        lines.append(
            f"| {it['method']} | {it['model']} | {it['precision']} | {it['compile']} | {okd or '-'} | "
            f"{ref or '-'} | {ratio} | {it.get('syncs', '-')} | {it['status']} |"
        )
    lines += [
        "",
        "## accuracy (CIFAR-10 test top-1 %)",
        "",
        "| method | model | precision | epochs done | head | final | best (epoch) | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in read_csv(out / "accuracy.csv"):
        lines.append(
            f"| {r['method']} | {r['model']} | {r['precision']} | {r['epochs_done']}/{r['epochs']} | "
            f"{r['head']} | {r['final_top1']} | {r['best_top1']} ({r['best_epoch']}) | {r['status']} |"
        )
    smoke = read_csv(out / "smoke.csv")
    bad = [r for r in smoke if r["status"] != "ok"]
    lines += ["", f"## smoke: {len(smoke) - len(bad)}/{len(smoke)} ok", ""]
    lines += [f"- {r['method']} {r['precision']}: {r['status']} {r.get('error', '')}".rstrip() for r in bad]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(
        json.dumps({"sections": sections, "seconds": round(seconds, 1), "env": env}, indent=1) + "\n"
    )
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for every result (created)")
    p.add_argument("--dry-run", action="store_true", help="the same sections on the CPU with tiny step counts")
    p.add_argument(
        "--data", default=None, help="CIFAR-10 root (official layout, or cifar10-jpeg.npz + make_cifar10.py)"
    )
    p.add_argument("--work", default=None, help="folder for the run folders (default: OUT_work next to OUT)")
    p.add_argument("--verify", action="store_true", help="only check that OUT holds every section's results")
    p.add_argument("--section", choices=SECTIONS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work = args.work or str(Path(args.out).resolve().parent / (Path(args.out).name + "_work"))
    if args.verify:
        missing, failed = missing_outputs(Path(args.out)), failed_smoke(Path(args.out))
        print(f"{args.out}: " + (f"missing or empty: {', '.join(missing)}" if missing else "every section's results"))
        if failed:
            print(f"{args.out}: smoke runs that failed: {', '.join(failed)} (their errors are in smoke.csv)")
        return 1 if missing or failed else 0
    if args.section is None:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return drive(args)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if args.dry_run:
        import torch

        torch.set_num_threads(1)
    {"env": section_env, "speed": section_speed, "accuracy": section_accuracy, "smoke": section_smoke}[args.section](
        Path(args.out), args
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
