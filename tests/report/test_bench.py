"""Smoke tests of ``okd bench`` (no timing assertions): both paths run, the CSV row has every column."""

from __future__ import annotations

import argparse
import csv

import pytest
import torch

from okd.bench import (
    CSV_COLUMNS,
    ReferenceDataset,
    ReferenceStep,
    Split,
    bench,
    build_optimizers,
    format_table,
    register_cli,
    window_plan,
)
from okd.errors import OKDError
from okd.methods.build import build_method, load_config

CONFIG = "cifar100/baseline_resnet20"
TINY = ["train.device=cpu", "data.batch_size=4", "data.root=/nonexistent"]


def test_bench_runs_both_paths_and_appends_csv(tmp_path):
    out = tmp_path / "results" / "bench.csv"
    cfg = load_config(CONFIG, TINY)
    report = bench(cfg, config_name=CONFIG, steps=2, warmup=1, windows=2, csv_path=out, command="pytest")
    assert [r.path for r in report.results] == ["okd", "reference"]
    assert all(r.images_per_s > 0 and len(r.window_images_per_s) == 2 for r in report.results)
    assert report.data.kind == "synthetic" and report.macs.total > 40e6  # resnet20: 40.8 M MACs per image
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["path"] for r in rows] == ["okd", "reference"]
    assert all(r["method"] == "baseline" and r["model"] == "resnet20" and r["batch"] == "4" for r in rows)
    assert all(float(r["images_per_s"]) > 0 and float(r["tflops"]) > 0 for r in rows)
    assert rows[1]["precision"] == "fp32" and rows[1]["data"] == "synthetic"
    table = format_table(report)
    assert "okd / reference" in table and "images/s" in table and "2*MACs*3" in table
    bench(cfg, config_name=CONFIG, steps=1, warmup=0, windows=1, reference=False, csv_path=out)
    with open(out, newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == ["okd", "reference", "okd"]


def test_csv_with_other_columns_is_refused(tmp_path):
    out = tmp_path / "bench.csv"
    out.write_text("a,b\n1,2\n")
    with pytest.raises(OKDError, match="columns"):
        bench(load_config(CONFIG, TINY), steps=1, warmup=0, windows=1, reference=False, csv_path=out)


def test_cli_parses_options():
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["bench", CONFIG, "train.precision=bf16", "--steps", "3", "--no-reference", "--csv", ""])
    assert args.items == [CONFIG, "train.precision=bf16"] and args.steps == 3 and not args.reference


def test_windows_interleave_abba():
    assert window_plan(5, 2, 2) == [(0, 3), (1, 3), (1, 2), (0, 2)]
    assert window_plan(2, 5, 1) == [(0, 1), (0, 1)]


def test_reference_transform_without_augmentation_is_normalisation():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    split = Split(images, torch.tensor([0, 1]), [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], "synthetic")
    x, y = ReferenceDataset(split, pad=0, padding_mode="reflect", flip=False)[1]
    expected = (images[1].float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]
    ).view(3, 1, 1)
    torch.testing.assert_close(x, expected)
    crops = ReferenceDataset(split, pad=4, padding_mode="zeros", flip=True).transform(images[0])
    assert crops.shape == (3, 32, 32)


def test_reference_step_is_per_component_for_ffsd():
    cfg = load_config("cifar100/ffsd_resnet20", TINY)
    method = build_method(cfg, 100)
    names, opts = build_optimizers(method, cfg)
    ref = ReferenceStep(method, names, opts)
    ref.step(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), 0)
    assert [keys[0].split("/")[0] for keys, _ in ref.plan] == ["student0", "student1", "fusion", "leader", "sd1", "sdL"]
    assert all(len(o) == 1 for _, o in ref.plan)


def test_bench_writes_no_file_without_csv(tmp_path, monkeypatch, capsys):
    """``okd bench`` prints its table and leaves the working directory as it was unless ``--csv PATH`` is given."""
    from okd.bench import main

    monkeypatch.chdir(tmp_path)
    args = ["cifar100/baseline_resnet20", *TINY, "--steps", "1", "--warmup", "0", "--windows", "1", "--no-reference"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "no CSV written" in out
    assert list(tmp_path.iterdir()) == []
    assert main([*args, "--csv", "rows.csv"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]
    assert "--csv rows.csv" in next(csv.DictReader(open(tmp_path / "rows.csv")))["command"]


def test_empty_csv_path_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    from okd.bench import main

    monkeypatch.chdir(tmp_path)
    assert main(["cifar100/baseline_resnet20", *TINY, "--steps", "1", "--no-reference", "--csv", ""]) == 2
    assert "--csv needs a file path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_also_eager_times_the_uncompiled_step_in_the_same_windows(tmp_path):
    """``--also-eager``: the compiled okd path, the same step uncompiled and the reference, ABBA in one run."""
    cfg = load_config("cifar100/baseline_resnet20", [*TINY, "train.compile=true"])
    with pytest.MonkeyPatch.context() as mp:  # dynamo's own eager backend: the CPU test stays fast
        import okd.engine.step as step

        real = step.compile_loss_function
        mp.setattr(step, "compile_loss_function", lambda fn, mode, backend, fullgraph: real(fn, mode, "eager"))
        report = bench(cfg, steps=2, warmup=1, windows=2, also_eager=True, reference=True, csv_path=tmp_path / "b.csv")
    assert [(r.path, r.compile) for r in report.results] == [("okd", True), ("okd-eager", False), ("reference", False)]
    assert all(len(r.window_images_per_s) == 2 for r in report.results)
    assert "compiled / eager" in format_table(report) and "okd / reference" in format_table(report)
    with open(tmp_path / "b.csv", newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == ["okd", "okd-eager", "reference"]
    with pytest.raises(OKDError, match="train.compile=true"):
        bench(load_config("cifar100/baseline_resnet20", TINY), steps=1, also_eager=True)
