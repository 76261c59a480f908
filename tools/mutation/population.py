"""Which mutants a run takes: the test files of each source file, the operator mix and the seeded sample, a
list of ids or a guards file."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from tools.mutation import ROOT
from tools.mutation.operators import OPERATORS, Mutant, mutants_of

CONTRACT, SHARED, FAULTS = "methods/test_contract.py", "methods/test_shared.py", "runs/test_faults.py"
TRAINING = "engine/test_training.py"
#: the config reference page against the code: fails when a default (a method parameter included) changes
EXPLAIN = "cli/test_explain.py"
#: image folders (okd/data/folder/): their own tests, then the messy-folder and own-network edge cases
FOLDER = [
    "data/test_folder_data.py", "data/test_messy_folders.py", "engine/test_last_batch.py",
    "models/test_own_network_edges.py",
]  # fmt: skip
#: source file -> the test files that cover it (under tests/), fastest first (pytest stops at the first failure)
TESTS: dict[str, list[str]] = {
    "okd/config.py": [
        "cli/test_config.py", "cli/test_cli_parsing.py", "runs/test_resume_policy.py", "config/test_recipes.py",
        "cli/test_explain.py",
    ],
    "okd/io.py": ["runs/test_io.py", "runs/test_run_store.py", "runs/test_safe_loading.py", FAULTS],
    "okd/data/cifar.py": ["data/test_data.py"],
    "okd/data/device_loader.py": ["data/test_data.py", "engine/test_last_batch.py", "data/test_views.py"],
    "okd/data/views.py": ["data/test_views.py", "methods/test_okdph.py"],
    "okd/data/randaugment.py": ["data/test_randaugment.py"],
    "okd/data/autoaugment.py": ["data/test_randaugment.py"],
    "okd/data/builder.py": ["data/test_data.py", "data/test_folder_data.py"],
    "okd/data/facts.py": [
        "data/test_data_facts.py", "data/test_data.py", "methods/test_members.py", "report/test_export.py"
    ],
    "okd/data/folder/builder.py": FOLDER,
    "okd/data/folder/dataset.py": FOLDER,
    "okd/data/folder/loader.py": FOLDER,
    "okd/data/folder/presets.py": FOLDER,
    "okd/data/folder/samplers.py": FOLDER,
    "okd/data/folder/scan.py": FOLDER,
    "okd/data/folder/transforms.py": FOLDER,
    "okd/nn/losses.py": ["models/test_nn_blocks.py", SHARED, "methods/test_ffsd.py", "methods/test_cmff.py"],
    "okd/nn/diversity.py": ["models/test_nn_blocks.py", "methods/test_ffsd.py"],
    "okd/nn/fusion.py": ["models/test_nn_blocks.py", "methods/test_ffsd.py", SHARED],
    "okd/nn/self_distillation.py": ["models/test_nn_blocks.py", "methods/test_ffsd.py"],
    "okd/nn/cross_attention.py": ["methods/test_cmff.py"],
    "okd/nn/rotation.py": ["methods/test_cmff.py"],
    "okd/nn/contrastive.py": ["models/test_contrastive.py", "methods/test_mcl.py", "methods/test_lmcl.py"],
    "okd/nn/distances.py": ["methods/test_switokd.py"],
    "okd/nn/hybrid.py": ["methods/test_okdph.py"],
    "okd/methods/base.py": [
        CONTRACT, SHARED, "engine/test_engine_mutants.py", "methods/test_switokd_multi.py", EXPLAIN
    ],
    "okd/methods/build.py": ["cli/test_config.py", CONTRACT],
    "okd/methods/branch_base.py": [CONTRACT, SHARED, "methods/test_one.py", EXPLAIN],
    "okd/methods/baseline.py": [CONTRACT, SHARED],
    "okd/methods/individual.py": [CONTRACT, SHARED, EXPLAIN],
    "okd/methods/one.py": ["methods/test_one.py", CONTRACT, SHARED, EXPLAIN],
    "okd/methods/cl_ilr.py": ["methods/test_cl_ilr.py", CONTRACT, SHARED, EXPLAIN],
    "okd/methods/okddip.py": ["methods/test_okddip.py", CONTRACT, SHARED, EXPLAIN],
    "okd/methods/ffl.py": ["methods/test_ffl.py", CONTRACT, SHARED, EXPLAIN],
    "okd/methods/dml.py": ["methods/test_dml.py", CONTRACT, SHARED, "methods/test_members.py", EXPLAIN],
    "okd/methods/leader_sl.py": ["methods/test_leader_sl.py", CONTRACT, SHARED, EXPLAIN],
    "okd/methods/kd.py": ["methods/test_kd.py", CONTRACT, SHARED, "runs/test_safe_loading.py", EXPLAIN],
    "okd/methods/kdcl.py": ["methods/test_kdcl.py", CONTRACT, SHARED, "methods/test_members.py", EXPLAIN],
    "okd/methods/pcl.py": ["methods/test_pcl.py", CONTRACT, SHARED, EXPLAIN],
    "okd/methods/cohort.py": ["methods/test_members.py", "engine/test_mixed_cohort_engine.py"],
    "okd/methods/ffsd.py": ["methods/test_ffsd.py", CONTRACT, EXPLAIN],
    "okd/methods/cmff.py": ["methods/test_cmff.py", CONTRACT, EXPLAIN],
    "okd/methods/cmff_net.py": ["methods/test_cmff.py", CONTRACT],
    "okd/methods/mcl.py": ["methods/test_mcl.py", CONTRACT, EXPLAIN],
    "okd/methods/lmcl.py": ["methods/test_lmcl.py", CONTRACT, EXPLAIN],
    "okd/methods/lmcl_net.py": ["methods/test_lmcl.py"],
    "okd/methods/lmcl_meta.py": ["methods/test_lmcl.py"],
    "okd/methods/okdph.py": ["methods/test_okdph.py", CONTRACT, EXPLAIN],
    "okd/methods/switokd.py": ["methods/test_switokd.py", "methods/test_switokd_ddp.py", CONTRACT, EXPLAIN],
    "okd/methods/switokd_multi.py": [
        "methods/test_switokd_multi.py", "methods/test_switokd_multi_ddp.py", CONTRACT, EXPLAIN
    ],
    "okd/engine/step.py": ["engine/test_engine_mutants.py", "methods/test_dml.py", TRAINING],
    "okd/engine/epoch.py": ["engine/test_engine_mutants.py", "engine/test_heartbeat.py", TRAINING],
    "okd/engine/last_batch.py": ["engine/test_last_batch.py"],
    "okd/engine/heartbeat.py": ["engine/test_heartbeat.py"],
    "okd/engine/distributed.py": [
        "engine/test_distributed_context.py", "engine/test_engine_mutants.py", "methods/test_dml.py",
        "engine/test_distributed.py",
    ],
    "okd/engine/run_log.py": ["report/test_run_report.py", "methods/test_members.py"],
    "okd/engine/tensorboard.py": ["report/test_report.py", "engine/test_trackers.py"],
    "okd/engine/threads.py": ["report/test_run_report.py", "engine/test_engine_mutants.py"],
    "okd/engine/tracker_sinks.py": ["engine/test_trackers.py"],
    "okd/engine/trackers.py": ["engine/test_trackers.py"],
    "okd/engine/evaluate.py": ["runs/test_run_store.py", "engine/test_eval_every.py", TRAINING],
    "okd/engine/schedules.py": ["engine/test_schedules.py"],
    "okd/engine/builder.py": ["engine/test_devices.py", "engine/test_schedules.py", SHARED],
    "okd/engine/seeding.py": ["engine/test_seeding.py", "engine/test_engine_mutants.py", TRAINING],
    "okd/engine/trainer.py": [
        "engine/test_engine_mutants.py", "engine/test_last_batch.py", "engine/test_eval_every.py",
        "methods/test_kdcl.py", "runs/test_resume_policy.py", FAULTS, TRAINING, "engine/test_distributed.py",
    ],
    "okd/runs/records.py": ["runs/test_run_store.py", "runs/test_safe_loading.py", FAULTS],
    "okd/runs/metrics.py": ["runs/test_run_store.py", "runs/test_resume_policy.py", FAULTS],
    "okd/runs/store.py": ["runs/test_run_store.py", FAULTS],
    "okd/runs/tracker_ids.py": ["engine/test_trackers.py", "runs/test_run_store.py"],
    "okd/runs/resume_policy.py": ["runs/test_resume_policy.py", FAULTS],
    "okd/runs/reader.py": ["runs/test_reader.py", FAULTS, "runs/test_safe_loading.py"],
}  # fmt: skip

#: ``--files core``: config, data, nn, methods, engine, runs (and io, the leaf the run folder stands on)
CORE = sorted(TESTS)

#: the default mix: the share of the sample drawn from each operator's mutants
DEFAULT_MIX = {
    "delete": 0.24,
    "early_return": 0.08,
    "swap_args": 0.08,
    "compare": 0.12,
    "token": 0.16,
    "off_by_one": 0.06,
    "drop_factor": 0.06,
    "context": 0.05,
    "detach": 0.05,
    "decorator": 0.02,
    "mean_sum": 0.04,
    "dim": 0.04,
}


def sample(mutants: list[Mutant], total: int | None, mix: dict[str, float], seed: int) -> list[Mutant]:
    """``total`` mutants drawn with ``seed``: each operator's share from ``mix`` (its unused share passed on to
    the others), each operator's draw spread evenly over the files (round-robin over shuffled per-file lists)."""
    if total is None or total >= len(mutants):
        return list(mutants)
    rng = random.Random(seed)
    by_op: dict[str, dict[str, list[Mutant]]] = defaultdict(lambda: defaultdict(list))
    for m in mutants:
        by_op[m.operator][m.file].append(m)
    weights = {op: w for op, w in mix.items() if op in by_op and w > 0}
    quota: dict[str, int] = {}
    left, pool = total, dict(weights)
    while left > 0 and pool:
        share = sum(pool.values())
        grant = {op: max(1, round(left * w / share)) for op, w in pool.items()}
        for op in sorted(pool):
            size = sum(len(v) for v in by_op[op].values())
            give = min(grant[op], size - quota.get(op, 0), left)
            quota[op] = quota.get(op, 0) + give
            left -= give
        pool = {op: w for op, w in pool.items() if quota.get(op, 0) < sum(len(v) for v in by_op[op].values())}
    chosen: list[Mutant] = []
    for op in sorted(quota):
        files = {f: rng.sample(ms, len(ms)) for f, ms in sorted(by_op[op].items())}
        order = rng.sample(sorted(files), len(files))
        picked = 0
        while picked < quota[op]:
            for f in order:
                if files[f] and picked < quota[op]:
                    chosen.append(files[f].pop())
                    picked += 1
    return sorted(chosen, key=lambda m: (m.file, m.line, m.col, m.operator, m.variant))


def parse_mix(text: str | None) -> dict[str, float]:
    if not text:
        return dict(DEFAULT_MIX)
    mix = {}
    for part in text.split(","):
        op, _, w = part.partition("=")
        if op not in OPERATORS:
            raise SystemExit(f"unknown operator {op!r}; choose from {', '.join(OPERATORS)}")
        mix[op] = float(w or 1)
    return mix


def tests_of(file: str) -> list[str]:
    return [f"tests/{t}" for t in TESTS[file]]


def read_ids(spec: str) -> list[str]:
    """Mutant ids from a file (one per line, ``#`` comments) or a comma-separated list."""
    path = Path(spec)
    if path.is_file():
        lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [line for line in lines if line]
    return [i.strip() for i in spec.split(",") if i.strip()]


def resolve_files(spec: list[str]) -> list[str]:
    files: list[str] = []
    for item in spec:
        if item == "core":
            files += CORE
        elif item.endswith("/") or (ROOT / item).is_dir():
            files += [f for f in CORE if f.startswith(item.rstrip("/") + "/")]
        elif item in TESTS:
            files.append(item)
        else:
            raise SystemExit(f"{item}: no test files mapped (add it to TESTS in tools/mutation/population.py)")
    return sorted(dict.fromkeys(files))


def resolve_guards(path: Path) -> dict[str, str]:
    """``{mutant id: promise}`` from a guards file: tab-separated rows ``promise, file, operator, the start of the
    change (as ``list`` prints it), the number of mutants it must match[, a text of their source line]``. A row
    that matches another number of mutants (the guard moved or changed) stops the run, naming the row."""
    found: dict[str, str] = {}
    of_file: dict[str, list[Mutant]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        promise, file, operator, start, count, *within = line.split("\t")
        source = (ROOT / file).read_text(encoding="utf-8").splitlines()
        if file not in of_file:
            of_file[file] = mutants_of(file)
        hits = [
            m
            for m in of_file[file]
            if m.operator == operator and m.change.startswith(start) and (not within or within[0] in source[m.line - 1])
        ]
        if len(hits) != int(count):
            raise SystemExit(f"{path}:{number}: {len(hits)} mutants match, not {count}: {line}")
        found.update({m.id: promise for m in hits})
    return found
