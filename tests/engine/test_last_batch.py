"""A last training batch of one image: left out for networks with BatchNorm (okd/engine/last_batch.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from folder_fixtures import quick_folder_run, write_class_folder
from torch import nn

from okd.config import DataConfig
from okd.data.device_loader import DeviceLoader
from okd.data.folder import build_folder_loaders
from okd.engine.last_batch import drop_single_image_batches, has_batch_statistics
from okd.engine.trainer import train
from okd.methods.build import load_config
from okd.runs.metrics import read_metrics_csv


def _device_loader(n: int, batch: int, train: bool = True) -> DeviceLoader:
    images = torch.arange(n * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 3, 4, 4)
    labels = torch.arange(n) % 3
    return DeviceLoader(images, labels, batch, mean=[0.5] * 3, std=[0.25] * 3, train=train, pad=1, seed=3)


@pytest.mark.parametrize(
    ("n", "batch", "world", "tail"),
    [(9, 8, 1, True), (10, 8, 1, False), (8, 8, 1, False), (1, 8, 1, True), (11, 8, 2, True), (12, 8, 2, False)],
)
def test_device_loader_knows_when_a_rank_gets_one_image(n, batch, world, tail):
    loader = _device_loader(n, batch)
    loader.shard(world - 1 if n == 11 else 0, world)  # 11 = 8 + 3: positions 0, 2 on rank 0, position 1 on rank 1
    assert loader.single_image_tail() is tail
    full = len(loader)
    loader.drop_single = True
    assert len(loader) == full - int(tail)


def test_the_other_batches_are_unchanged_when_the_single_one_is_left_out():
    kept, dropped = _device_loader(17, 8), _device_loader(17, 8)
    dropped.drop_single = True
    a, b = list(kept), list(dropped)
    assert len(a) == 3 and len(b) == 2 and a[-1][1].numel() == 1
    for (xa, ya), (xb, yb) in zip(a, b, strict=False):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not _device_loader(9, 8, train=False).single_image_tail()  # evaluation keeps every image


def test_only_networks_with_batchnorm_leave_it_out(caplog):
    plain, normed = nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    assert not has_batch_statistics(plain) and has_batch_statistics(normed)
    loader = _device_loader(9, 8)
    assert not drop_single_image_batches(plain, loader) and len(loader) == 2
    with caplog.at_level(logging.WARNING, logger="okd"):
        assert drop_single_image_batches(normed, loader) and len(loader) == 1
    assert "would hold a single image" in caplog.text
    even = _device_loader(10, 8)
    assert not drop_single_image_batches(normed, even) and len(even) == 2


def test_one_on_resnet20_trains_when_the_last_batch_holds_one_image(tmp_path, capfd):
    pytest.importorskip("PIL")
    data = write_class_folder(tmp_path / "data", train_per_class=3, val_per_class=1)  # 9 images, batches of 8
    overrides = quick_folder_run(data, tmp_path / "runs", 8, "pad_crop", "data.pad=1", "name=one9")
    overrides = [o for o in overrides if not o.startswith("train.max_steps_per_epoch")]
    cfg = load_config(None, [*overrides, "method.name=one", "model.name=resnet20", "train.epochs=1"])
    run = train(cfg)  # BatchNorm1d in ONE's gate fails on a one-image batch: it is left out instead
    err = capfd.readouterr().err
    assert "batch 2 of 2, data.batch_size=8" in err and "left out of every epoch" in err
    assert read_metrics_csv(run / "metrics.csv")[-1]["time/images_per_s"] > 0
    assert (run / "deploy.pt").is_file()


def test_a_batch_shrunk_to_one_image_by_unreadable_files_is_skipped(tmp_path, caplog):
    pytest.importorskip("PIL")
    data = write_class_folder(tmp_path / "data", classes=("a", "b"), train_per_class=1, val_per_class=1)
    (data / "train" / "b" / "0.png").write_text("not an image")  # the one batch of 2 holds one readable image
    cfg = DataConfig(
        dataset="folder", root=str(data), image_size=8, resize=8, train_crop="center", batch_size=2, workers=0,
        pin_memory=False, skip_unreadable=True,
    )  # fmt: skip
    loader = build_folder_loaders(cfg, 0, "cpu", rank=0, world_size=1)[0]
    assert [y.tolist() for _, y in loader] == [[0]]  # without BatchNorm the image trains alone
    assert not drop_single_image_batches(nn.Sequential(nn.BatchNorm2d(3)), loader)  # no static tail of one
    with caplog.at_level(logging.WARNING, logger="okd"):
        assert list(loader) == []
    assert "1 batch(es) left with a single image were left out" in caplog.text
