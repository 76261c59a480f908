"""``benchmarks/gpu_check.py``: its plan (budgets, priority order) and its result files, without a GPU.

The whole script runs in CI as ``bash benchmarks/gpu_check.sh OUT --dry-run`` followed by ``--verify``
(``.ci/run``); these tests cover the logic that decides what a 9-minute GPU run measures and reports.
"""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import helpers
import pytest

REPO = helpers.REPO


@pytest.fixture(scope="module")
def gc():
    """The driver (``benchmarks/gpu_check.py``) with the names of its plan module (``gpu_check_plan``)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts benchmarks/ on sys.path for its own imports
    plan = importlib.import_module("gpu_check_plan")
    for name, value in vars(plan).items():
        if not name.startswith("__") and not hasattr(module, name):
            setattr(module, name, value)
    return module


def test_budgets_fit_nine_minutes_on_a_gpu_and_three_for_the_dry_run(gc):
    def total(b):  # accuracy runs in the background while smoke runs; 30 s for start-up, decoding, summary
        return b["env"] + b["speed"] + max(b["accuracy"], b["smoke"]) + 30

    assert set(gc.BUDGET_S) == set(gc.DRY_BUDGET_S) == set(gc.SECTIONS)
    assert total(gc.BUDGET_S) <= 9 * 60
    assert total(gc.DRY_BUDGET_S) <= 3 * 60


def test_speed_items_cover_the_matrix_most_important_first(gc):
    items = gc.speed_items(dry=False)
    keys = [(i["method"], i["model"], i["precision"], i["compile"]) for i in items]
    assert len(keys) == len(set(keys)) == 5 * 2 * 2 * 2  # methods x models x precisions x eager/compiled
    assert keys[:4] == [("ffsd", "resnet32", "bf16", False), ("baseline", "resnet32", "bf16", False),
                        ("ffsd", "resnet32", "fp32", False), ("baseline", "resnet32", "fp32", False)]  # fmt: skip
    assert keys[4:6] == [("ffsd", "resnet32", "bf16", True), ("baseline", "resnet32", "bf16", True)]
    assert [k[:2] for k in keys[: gc.DRY["speed_items"]]] == [k[:2] for k in keys[:2]]
    assert gc.speed_items(dry=True) == items[: gc.DRY["speed_items"]]
    assert all(not i["compile"] for i in gc.speed_items(dry=True))


def test_accuracy_runs_are_baseline_dml_ffsd_on_resnet20_and_32_in_both_precisions(gc):
    assert sorted(gc.ACCURACY_RUNS) == sorted(
        (m, n, p) for m in ("baseline", "dml", "ffsd") for n in ("resnet20", "resnet32") for p in ("bf16", "fp32")
    )


def test_synthetic_cifar10_is_an_official_layout_okd_reads(gc, tmp_path):
    from okd.data.cifar import load_cifar

    root = gc.synthetic_cifar10(tmp_path / "c10", per_file=8)
    train, test = load_cifar(root, "cifar10", train=True), load_cifar(root, "cifar10", train=False)
    assert len(train) == 40 and len(test) == 8
    assert gc.cifar10_root(str(root), tmp_path, dry=False) == root
    with pytest.raises(SystemExit, match="cifar-10-batches-py"):
        gc.cifar10_root(str(tmp_path), tmp_path, dry=False)


def test_summary_reports_each_section_and_verify_finds_missing_files(gc, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert set(gc.missing_outputs(out)) == {f for files in gc.OUTPUTS.values() for f in files}
    (out / "env.json").write_text(json.dumps({"hardware": "NVIDIA H200 (140 GiB), CUDA 13.0", "torch": "2.11"}))
    items = [{"method": "ffsd", "model": "resnet32", "precision": "bf16", "compile": False, "status": "ok",
              "images_per_s": {"okd": 30000.0, "reference": 5000.0}, "syncs": 0}]  # fmt: skip
    (out / "speed_items.json").write_text(json.dumps(items))
    (out / "speed.csv").write_text("timestamp\n")
    row = {"method": "ffsd", "model": "resnet20", "precision": "bf16", "epochs": 15, "epochs_done": 9,
           "head": "leader", "final_top1": 80.1, "best_top1": 80.5, "best_epoch": 8,
           "status": "stopped at the budget after 9 epoch(s)"}  # fmt: skip
    gc.append_csv(out / "accuracy.csv", row, gc.ACCURACY_COLUMNS)
    gc.append_csv(out / "smoke.csv", {"method": "kd", "precision": "fp32", "status": "error", "error": "boom"},
                  gc.SMOKE_COLUMNS)  # fmt: skip
    sections = {n: {"status": "ok", "seconds": 1.0} for n in gc.SECTIONS}
    sections["accuracy"]["status"] = "stopped at its budget"
    text = gc.write_summary(out, sections, 12.0, gc.BUDGET_S)
    assert "NVIDIA H200" in text and "| accuracy | stopped at its budget |" in text
    assert "| ffsd | resnet32 | bf16 | False | 30000.0 | 5000.0 | 6.00x | 0 | ok |" in text
    assert "9/15 | leader | 80.1 | 80.5 (8)" in text
    assert "smoke: 0/1 ok" in text and "kd fp32: error boom" in text
    (out / "gpu_check.log").write_text("log\n")
    assert gc.missing_outputs(out) == [] and gc.failed_smoke(out) == ["kd fp32"]
    assert gc.main([str(out), "--verify"]) == 1  # a method that cannot train its smoke run fails the check
    (out / "smoke.csv").unlink()
    gc.append_csv(out / "smoke.csv", {"method": "kd", "precision": "fp32", "status": "ok"}, gc.SMOKE_COLUMNS)
    assert gc.main([str(out), "--verify"]) == 0


@pytest.mark.parametrize("method", ["mcl", "lmcl"])
def test_the_smoke_run_of_a_contrastive_method_takes_class_balanced_batches(gc, method, tmp_path):
    """Their supervised contrast needs two images of each class in a batch: the smoke run uses their recipe's
    sampler, and one dry-run step trains."""
    sections = importlib.import_module("gpu_check_sections")
    overrides = sections.smoke_overrides(method, "fp32", tmp_path / "none", tmp_path, True, method, 1)
    assert {"data.sampler=m_per_class", "data.m_per_class=2"} <= set(overrides)
    root = gc.synthetic_cifar10(tmp_path / "c10")
    args = SimpleNamespace(dry_run=True)
    row = sections.smoke_item(method, "fp32", root, tmp_path / "work", args, deterministic=True)
    assert row["status"] == "ok", row
