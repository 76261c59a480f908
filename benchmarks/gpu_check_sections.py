"""The sections of ``gpu_check`` (each runs in its own process, with its budget: ``--section NAME``)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpu_check_plan import (
    ACCURACY_COLUMNS,
    ACCURACY_EPOCHS,
    ACCURACY_RUNS,
    DRY,
    REPO,
    RESUME_DRY,
    SMOKE_COLUMNS,
    Deadline,
    append_csv,
    cifar10_root,
    now,
    one_line,
    read_csv,
    speed_items,
)


def section_env(out: Path, args) -> None:
    import torch

    from okd.bench import git_commit, hardware_line

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda and not args.dry_run else "cpu")
    smi = ""
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        smi = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
    info = {
        "date": now(),
        "dry_run": args.dry_run,
        "device": str(device),
        "hardware": hardware_line(device),
        "nvidia_smi": smi,
        "cuda_device_name": torch.cuda.get_device_name() if cuda else "",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "cudnn": str(torch.backends.cudnn.version()) if cuda else "",
        "python": platform.python_version(),
        "commit": git_commit(),
        "host_cpus": os.cpu_count(),
    }
    (out / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))


def section_speed(out: Path, args) -> None:
    from okd.bench import bench
    from okd.methods.build import load_config

    deadline = Deadline(args.budget)
    device = "cpu" if args.dry_run else "cuda"
    status: list[dict] = []
    for item in speed_items(args.dry_run):
        config = f"cifar100/{item['method']}_{item['model']}"
        overrides = [f"train.device={device}", f"train.precision={item['precision']}", "train.channels_last=true"]
        if item["compile"]:
            overrides += ["train.compile=true", "train.compile_mode=reduce-overhead"]
        steps, warmup, windows = (50, 15 if item["compile"] else 10, 5) if not args.dry_run else (2, 1, 1)
        if args.dry_run:
            overrides += ["data.batch_size=8"]
        entry = {**item, "config": config, "overrides": overrides, "status": "skipped (budget)", "seconds": 0.0}
        status.append(entry)
        if deadline.left() < (60 if item["compile"] else 15) * (0.2 if args.dry_run else 1):
            continue
        start = time.monotonic()
        try:
            cfg = load_config(config, overrides)
            report = bench(
                cfg,
                config_name=config,
                steps=steps,
                warmup=warmup,
                windows=windows,
                reference=not item["compile"],
                synthetic=True,
                check_syncs=True,
                csv_path=out / "speed.csv",
                command="benchmarks/gpu_check.py speed: okd bench " + " ".join([config, *overrides]),
            )
            entry["status"] = "ok"
            entry["images_per_s"] = {r.path: round(r.images_per_s, 1) for r in report.results}
            entry["syncs"] = report.results[0].syncs
        except Exception as exc:  # one failing item must not stop the section
            entry["status"] = "error: " + one_line(exc)
        entry["seconds"] = round(time.monotonic() - start, 1)
        print(json.dumps(entry), flush=True)
        (out / "speed_items.json").write_text(json.dumps(status, indent=1) + "\n")
    (out / "speed_items.json").write_text(json.dumps(status, indent=1) + "\n")


def section_accuracy(out: Path, args) -> None:
    """All runs at once (small networks leave a big GPU mostly idle); stopped at the budget, each run keeps the
    epochs it finished (metrics.csv is written at every epoch end)."""
    deadline = Deadline(args.budget, margin=15.0)
    root = cifar10_root(args.data, Path(args.work), args.dry_run)
    runs = ACCURACY_RUNS[: DRY["accuracy_runs"]] if args.dry_run else ACCURACY_RUNS
    epochs = DRY["accuracy_epochs"] if args.dry_run else ACCURACY_EPOCHS
    milestones = [max(1, epochs // 2), max(1, (3 * epochs) // 4)]
    work = Path(args.work) / "accuracy"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    procs = []
    for method, model, precision in runs:
        config = f"cifar10/{method}_resnet32"  # DML has no ResNet-20 config: the ResNet-32 one with model.name
        name = f"{method}_{model}_{precision}"
        overrides = [
            f"model.name={model}",
            f"data.root={root}",
            "data.download=false",
            f"train.epochs={epochs}",
            f"optim.milestones=[{milestones[0]},{milestones[1]}]",
            f"train.precision={precision}",
            f"train.device={'cpu' if args.dry_run else 'cuda'}",
            "train.progress=log",
            f"output_dir={work}",
            f"name={name}",
        ]
        if args.dry_run:
            overrides += ["data.limit_train=128", "data.limit_test=64", "data.batch_size=32"]
        log = open(work / f"{name}.log", "w")
        cmd = [sys.executable, "-m", "okd", "train", config, *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        procs.append((method, model, precision, name, proc, log, time.monotonic()))
    ended: dict[str, float] = {}
    while len(ended) < len(procs) and deadline.left() > 0:
        for *_, name, proc, _, start in procs:
            if name not in ended and proc.poll() is not None:
                ended[name] = time.monotonic() - start
        time.sleep(1.0)
    for *_, proc, _, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the trainer stops between steps; finished epochs stay
    for *_, name, proc, log, start in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ended.setdefault(name, time.monotonic() - start)
    for method, model, precision, name, proc, _, _ in procs:
        rows = read_csv(work / name / "metrics.csv")
        status = (
            "ok"
            if proc.returncode == 0 and len(rows) == epochs
            else (
                f"stopped at the budget after {len(rows)} epoch(s)"
                if proc.returncode != 0 and rows
                else f"failed (exit {proc.returncode}, see {work / name}.log)"
            )
        )
        heads = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("test/") and k.endswith("/top1")})
        base = {
            "method": method,
            "model": model,
            "precision": precision,
            "epochs": epochs,
            "epochs_done": len(rows),
            "status": status,
            "seconds": round(ended[name], 1),
            "run_dir": str(work / name),
        }
        if not heads:
            append_csv(out / "accuracy.csv", {**base, "head": ""}, ACCURACY_COLUMNS)
        for head in heads:
            values = [
                (float(r[f"test/{head}/top1"]), int(float(r["epoch"]))) for r in rows if r.get(f"test/{head}/top1")
            ]
            best = max(values)
            append_csv(
                out / "accuracy.csv",
                {**base, "head": head, "final_top1": values[-1][0], "best_top1": best[0], "best_epoch": best[1]},
                ACCURACY_COLUMNS,
            )
        print(json.dumps({**base, "heads": heads}), flush=True)


def smoke_overrides(method: str, precision: str, root: Path, work: Path, dry: bool, name: str, epochs: int):
    overrides = [
        f"method.name={method}",
        "model.name=resnet20",
        "data.dataset=cifar10",
        f"data.root={root}",
        "data.download=false",
        f"train.device={'cpu' if dry else 'cuda'}",
        f"train.precision={precision}",
        f"train.epochs={epochs}",
        f"train.max_steps_per_epoch={1 if dry else 3}",
        "train.deterministic=true",
        "train.progress=none",
        f"data.batch_size={16 if dry else 128}",
        f"data.limit_train={64 if dry else 1024}",
        f"data.limit_test={32 if dry else 512}",
        f"output_dir={work}",
        f"name={name}",
    ]
    if method in ("mcl", "lmcl"):  # supervised contrast: every class of a batch needs a second image (their recipe's)
        overrides += ["data.sampler=m_per_class", "data.m_per_class=2"]
    if method == "kd":
        overrides += [
            "method.teacher_model=resnet20",
            f"method.teacher_checkpoint={work / 'baseline_fp32' / 'deploy.pt'}",
        ]
    return overrides


def smoke_item(method: str, precision: str, root: Path, work: Path, args, deterministic: bool) -> dict:
    """One epoch (a checkpoint), a resume to epoch 2, and (where planned) a straight 2-epoch run to compare."""
    import torch

    from okd.engine.trainer import config_from_run, train
    from okd.io import load_checkpoint
    from okd.methods.build import load_config

    name = f"{method}_{precision}" + ("" if deterministic else "_nondet")
    extra = [f"train.deterministic={str(deterministic).lower()}"]
    run = train(load_config(None, smoke_overrides(method, precision, root, work, args.dry_run, name, 1) + extra))
    resumed = train(config_from_run(run, ["train.epochs=2"]), run_dir=run, resume=True)
    ckpt = load_checkpoint(resumed / "last.pt")
    last = ckpt["history"][-1]
    heads = sorted(k.split("/")[1] for k in last if k.startswith("test/") and k.endswith("/top1"))
    row = {
        "steps_per_epoch": 1 if args.dry_run else 3,
        "heads": " ".join(heads),
        "resumed_to_epoch": ckpt["epoch"],
        "top1": " ".join(f"{last[f'test/{h}/top1']:.2f}" for h in heads),
    }
    if not args.dry_run or method in RESUME_DRY:
        overrides = smoke_overrides(method, precision, root, work, args.dry_run, name + "_straight", 2) + extra
        other = load_checkpoint(train(load_config(None, overrides)) / "last.pt")["method"]
        row["resume_exact"] = all(torch.equal(v, other[k]) for k, v in ckpt["method"].items())
    finite = all(v == v and abs(v) != float("inf") for v in last.values() if isinstance(v, float))
    row["status"] = "ok" if finite and row.get("resume_exact", True) and len(heads) > 0 else "check"
    return row


def section_smoke(out: Path, args) -> None:
    """Every method, fp32 and bf16: one epoch (a checkpoint), a resume to epoch 2, and a straight 2-epoch run that
    the resumed one must equal bitwise (deterministic kernels)."""

    from okd.methods import METHODS

    deadline = Deadline(args.budget)
    root = cifar10_root(args.data, Path(args.work), args.dry_run)
    work = Path(args.work) / "smoke"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    names = METHODS.names()
    plan = [(m, "fp32") for m in names] + [(m, "bf16") for m in names if not args.dry_run or m in RESUME_DRY]
    for method, precision in plan:
        row = {
            "method": method,
            "precision": precision,
            "device": "cpu" if args.dry_run else "cuda",
            "status": "skipped (budget)",
        }
        if deadline.left() < 3:
            append_csv(out / "smoke.csv", row, SMOKE_COLUMNS)
            continue
        start = time.monotonic()
        try:
            row.update(smoke_item(method, precision, root, work, args, deterministic=True))
        except Exception as exc:  # one failing method must not stop the section
            if "deterministic" not in str(exc):
                row.update(status="error", error=one_line(exc))
            else:  # a CUDA kernel without a deterministic implementation: report it, then check the rest anyway
                note = "train.deterministic=true failed (" + one_line(exc)[:160] + "); rerun without it"
                try:
                    row.update(smoke_item(method, precision, root, work, args, deterministic=False), error=note)
                except Exception as again:
                    row.update(status="error", error=note + "; then " + one_line(again))
        row["seconds"] = round(time.monotonic() - start, 1)
        append_csv(out / "smoke.csv", row, SMOKE_COLUMNS)
        print(json.dumps(row), flush=True)
