"""A run of one's own network read back by the file commands: attention without taps, export file names,
``okd test`` on a safetensors export, ``okd predict`` over a folder with an unreadable image."""

from __future__ import annotations

import argparse
import io
import sys
import textwrap
from contextlib import redirect_stdout

import helpers
import pytest

from okd.engine.trainer import train
from okd.errors import CheckpointError, ConfigError
from okd.methods.build import load_config
from okd.report.commands import register_cli
from okd.report.export import export_stem
from okd.report.scoring import score_checkpoint
from okd.runs.metrics import read_metrics_csv

pytest.importorskip("PIL")
from folder_fixtures import quick_folder_run, write_class_folder  # noqa: E402

MODULE = "okd_files_cnn"
CODE = """
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool, self.flatten, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.layer1(self.stem(x)))))


def build(num_classes):
    return Net(num_classes)
"""


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """One epoch of the baseline on a network of one's own (no taps), and its data."""
    base = tmp_path_factory.mktemp("own")
    (base / "code").mkdir()
    (base / "code" / f"{MODULE}.py").write_text(textwrap.dedent(CODE))
    sys.path.insert(0, str(base / "code"))
    data = write_class_folder(base / "data", train_per_class=4, val_per_class=2)
    overrides = quick_folder_run(data, base / "runs", 12, "pad_crop", "data.pad=1", "name=own")
    cfg = load_config(None, [*overrides, "method.name=baseline", f"model.name={MODULE}:build", "train.epochs=1"])
    run = train(cfg)
    mp = pytest.MonkeyPatch()
    mp.setenv("OKD_ALLOW_IMPORT", MODULE)
    yield run, data
    mp.undo()
    sys.path.remove(str(base / "code"))
    sys.modules.pop(MODULE, None)


def _cli_status(*argv) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="okd")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = args.func(args)
    return code, buf.getvalue()


def test_attention_without_taps_says_how_to_pass_them(own_run, tmp_path):
    pytest.importorskip("matplotlib")
    run, _ = own_run
    with pytest.raises(ConfigError, match=r"no feature taps .*okd attention .*model\.taps=\[.*\['stem', 'layer1'"):
        helpers.cli("attention", run, "--out", tmp_path / "a.png", "--similarity-images", "4")
    text = helpers.cli("attention", run, "model.taps=[stem,layer1]", "--out", tmp_path / "a.png", "--images", "2")
    assert "wrote" in text and (tmp_path / "a.png").is_file()


def test_export_file_names_have_no_colon(own_run):
    assert export_stem(f"{MODULE}:build") == f"{MODULE}-build"
    assert export_stem("timm:resnet18") == "timm-resnet18" and export_stem("resnet32") == "resnet32"
    assert export_stem('a/b\\c<d>e|f?g*h"i') == "a-b-c-d-e-f-g-h-i"
    run, _ = own_run
    text = helpers.cli("export", run, "--format", "safetensors")
    assert f"export/{MODULE}-build.safetensors" in text.replace("\\", "/")
    assert (run / "export" / f"{MODULE}-build.safetensors").is_file()


def test_okd_test_scores_a_safetensors_export(own_run, tmp_path):
    pytest.importorskip("safetensors")
    run, _ = own_run
    out = run / "export" / "net.safetensors"
    helpers.cli("export", run, "--format", "safetensors", "--out", out)
    metrics, info = score_checkpoint(out)  # the run folder above export/ holds its config.yaml
    last = read_metrics_csv(run / "metrics.csv")[-1]
    assert info["deploy_head"] == "net" and metrics["net/top1"] == pytest.approx(last["test/net/top1"], abs=1e-6)
    alone = tmp_path / "elsewhere" / "net.safetensors"
    alone.parent.mkdir()
    alone.write_bytes(out.read_bytes())
    with pytest.raises(CheckpointError, match="without the run's config.yaml beside it"):
        score_checkpoint(alone)
    (alone.parent / "config.yaml").write_bytes((run / "config.yaml").read_bytes())
    assert score_checkpoint(alone)[0]["net/top1"] == metrics["net/top1"]


def test_predict_goes_on_past_an_unreadable_image_and_fails_at_the_end(own_run, tmp_path):
    run, data = own_run
    bad, missing = tmp_path / "bad.png", tmp_path / "gone.png"
    bad.write_text("not an image")
    good = [data / "val" / "square" / "0.png", data / "val" / "zigzag" / "1.png"]
    code, text = _cli_status("predict", run, good[0], bad, missing, good[1], "--top", "2")
    assert code == 1
    head, _, tail = text.partition("2 of 4 image(s) could not be read")
    assert str(good[0]) in head and str(good[1]) in head and str(bad) not in head
    assert f"{bad}: UnidentifiedImageError" in tail and f"{missing}: FileNotFoundError" in tail
    assert _cli_status("predict", run, *good)[0] == 0
