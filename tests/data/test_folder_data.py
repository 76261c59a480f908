"""ImageNet-style folders: layout parsing, transforms, determinism, sharding and error reporting."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from okd.config import DataConfig
from okd.data import build_loaders
from okd.data.device_loader import DeviceLoader
from okd.data.folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FolderDataset,
    FolderLoader,
    ResizeCenterCropTransform,
    ShardSampler,
    TinyTrainTransform,
    _rrc_params,
    balanced_prefix,
    build_folder_loaders,
    build_transforms,
    scan,
    scan_class_folders,
    scan_imagenet,
    scan_tinyimagenet,
    scan_train_val,
)
from okd.data.folder.builder import geometry
from okd.data.folder.loader import default_workers
from okd.data.folder.samplers import dist_rank_world
from okd.data.folder.scan import _names
from okd.data.folder.transforms import _center_crop, _pil, _resize_shorter, sample_generator
from okd.errors import ConfigError, DataError

pytest.importorskip("PIL")
import folder_fixtures  # noqa: E402
from folder_fixtures import IMAGENET_CLASSES, write_class_folder, write_tinyimagenet_folder  # noqa: E402
from PIL import Image  # noqa: E402

imagenet_folder = folder_fixtures.imagenet_folder  # the shared fixture


def cfg(root: Path, dataset: str = "imagenet", **kw) -> DataConfig:
    base = {"batch_size": 4, "test_batch_size": 4, "workers": 0, "pin_memory": False}
    base.update(kw)
    return DataConfig(dataset=dataset, root=str(root), **base)


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def copy_of(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


# ---------------------------------------------------------------------------------------------- ImageNet
def test_scan_imagenet_layout(imagenet_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="okd"):
        train, val = scan_imagenet(imagenet_folder)
    assert "3 class folders (ImageNet has 1000); training a 3-way classifier" in caplog.text
    assert train.classes == list(IMAGENET_CLASSES) == val.classes
    assert len(train) == 12 and len(val) == 6
    assert np.bincount(train.labels).tolist() == [4, 4, 4]
    assert all(Path(train.path(i)).parent.name == IMAGENET_CLASSES[train.labels[i]] for i in range(12))


def test_imagenet_loaders_shapes_labels_and_test_transform(imagenet_folder):
    train, test, k, names = build_loaders(cfg(imagenet_folder), seed=0, device="cpu")
    assert (k, names) == (3, list(IMAGENET_CLASSES))
    assert len(train) == 3 and len(test) == 2 and train.num_samples == 12 and test.num_samples == 6
    train.set_epoch(0)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    xt, yt = collect(test)
    assert xt.shape == (6, 3, 224, 224) and yt.tolist() == [0, 0, 1, 1, 2, 2]  # in order, each once
    # test transform = Resize(256) shorter side -> CenterCrop(224) -> normalise, computed independently
    _, val = scan_imagenet(imagenet_folder)
    img = Image.open(val.path(0)).convert("RGB")  # 50 x 40 (w x h)
    ref = np.asarray(img.resize((320, 256), Image.BILINEAR), dtype=np.float32)[16:240, 48:272]
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    ref = torch.from_numpy(((ref / 255.0 - mean) / std).transpose(2, 0, 1)).float()
    torch.testing.assert_close(xt[0], ref, atol=1e-5, rtol=0)


def test_channels_last_and_views(imagenet_folder):
    train, _, _, _ = build_loaders(cfg(imagenet_folder), seed=0, device="cpu", views=2)
    train.channels_last = True
    xs, y = next(iter(train))
    assert isinstance(xs, list) and len(xs) == 2 and xs[0].shape == (4, 3, 224, 224)
    assert xs[0].is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(xs[0], xs[1])  # independent draws of the same images


def _epoch_batches(root: Path, workers: int, seed: int, epochs=(0, 1)) -> list[list[torch.Tensor]]:
    train, _, _, _ = build_loaders(cfg(root, workers=workers), seed=seed, device="cpu")
    out = []
    for e in epochs:
        train.set_epoch(e)
        out.append([t for x, y in train for t in (x, y)])
    return out


def test_determinism_across_worker_counts(imagenet_folder):
    single = _epoch_batches(imagenet_folder, 0, seed=3)
    multi = _epoch_batches(imagenet_folder, 2, seed=3)
    for a, b in zip(single, multi, strict=True):
        assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(single[0][0], single[1][0])  # another epoch, other order and crops
    other_seed = _epoch_batches(imagenet_folder, 0, seed=4, epochs=(0,))
    assert not torch.equal(single[0][0], other_seed[0][0])


def test_pass_advances_epoch_like_device_loader(imagenet_folder):
    a, _, _, _ = build_loaders(cfg(imagenet_folder), seed=0, device="cpu")
    b, _, _, _ = build_loaders(cfg(imagenet_folder), seed=0, device="cpu")
    collect(a)  # pass 0, then pass 1
    b.set_epoch(1)
    assert torch.equal(collect(a)[0], collect(b)[0])


def test_random_resized_crop_params_in_bounds():
    rng = np.random.default_rng(0)
    for w, h in [(50, 40), (500, 375), (3, 400), (400, 3)]:
        for _ in range(50):
            top, left, ch, cw = _rrc_params(w, h, rng)
            assert 0 <= top and 0 <= left and 0 < ch and 0 < cw and top + ch <= h and left + cw <= w


def test_random_resized_crop_draws_areas_and_ratios_within_its_ranges():
    """On a 500 x 375 image nearly every draw fits at the first try: crops of 8-100 % of the area (up to rounding)
    and aspect 3/4-4/3, at varied sizes and places, rarely the fallback's whole image."""
    rng = np.random.default_rng(0)
    crops = [_rrc_params(500, 375, rng) for _ in range(200)]
    for _, _, ch, cw in crops:
        assert 0.08 * 0.97 <= ch * cw / (500 * 375) <= 1.0 and 0.74 <= cw / ch <= 1.35
    assert len({(ch, cw) for _, _, ch, cw in crops}) > 150 and len({(t, x) for t, x, _, _ in crops}) > 100
    assert sum(c == (0, 0, 375, 500) for c in crops) < 5


def test_the_test_resize_defaults_to_the_crop_over_0_875():
    assert geometry(DataConfig(dataset="folder", image_size=224)) == (224, 256, "random_resized")
    assert geometry(DataConfig(dataset="folder", image_size=64, resize=72)) == (64, 72, "random_resized")


def test_class_lists_in_messages_show_five_names_and_count_the_rest():
    assert _names(["a", "b", "c", "d", "e"]) == "a, b, c, d, e"
    assert _names(["a", "b", "c", "d", "e", "f", "g"]) == "a, b, c, d, e (+2 more)"


class CountingRng:
    """Stands in for a numpy Generator: fixed draws, counted (the uniform draws give the largest area and ratio)."""

    def __init__(self) -> None:
        self.uniform_calls = 0

    def uniform(self, low: float, high: float) -> float:
        self.uniform_calls += 1
        return high

    def integers(self, low: int, high: int) -> int:
        return low


def test_a_crop_as_wide_or_as_high_as_the_image_is_taken_at_the_first_try():
    """The draw is accepted when the crop fits, its sides equal to the image's included: a 20 x 10 image at the
    full area and ratio 2 is a crop of 20 x 10, taken from the first area and ratio drawn (no further tries)."""
    rng = CountingRng()
    assert _rrc_params(20, 10, rng, scale=(0.5, 1.0), ratio=(1.0, 2.0)) == (0, 0, 10, 20)
    assert rng.uniform_calls == 2


def test_random_resized_crop_falls_back_to_the_central_crop_of_an_allowed_ratio():
    """When none of the 10 tries fits (here: every target area exceeds the image), torchvision's fallback: the whole
    image if its ratio is within [3/4, 4/3] (bounds included), else the largest central crop at the nearest bound."""
    rng = np.random.default_rng(0)
    for (w, h), want in {
        (20, 20): (0, 0, 20, 20),
        (30, 40): (0, 0, 40, 30),  # ratio exactly 3/4
        (40, 30): (0, 0, 30, 40),  # ratio exactly 4/3
        (41, 30): (0, 0, 30, 40),  # just above 4/3: cut to 40 wide, offset (41 - 40) // 2 = 0
        (10, 20): (3, 0, 13, 10),  # 1/2: 10 wide, round(10 * 4/3) = 13 high, centred
        (20, 10): (0, 3, 10, 13),  # 2: 10 high, 13 wide, centred
    }.items():
        assert _rrc_params(w, h, rng, scale=(1.5, 2.0)) == want, (w, h)


def test_limits_are_class_balanced(imagenet_folder):
    assert balanced_prefix(np.array([0, 0, 0, 1, 1, 2]), 4).tolist() == [0, 1, 3, 5]
    train, test, _, _ = build_loaders(cfg(imagenet_folder, limit_train=5, limit_test=3), seed=0, device="cpu")
    assert train.num_samples == 5 and sorted(collect(train)[1].tolist()) == [0, 0, 1, 1, 2]
    assert collect(test)[1].tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------ TinyImageNet
def test_tinyimagenet_layout_parsing(tmp_path, caplog):
    wnids = ("n02124075", "n01443537", "n04067472")
    top = write_tinyimagenet_folder(tmp_path, wnids=wnids)
    with caplog.at_level(logging.WARNING, logger="okd"):
        scan_tinyimagenet(top)
    assert "3 classes in wnids.txt (TinyImageNet-200 has 200)" in caplog.text
    for root in (tmp_path, top):  # the folder itself or its parent
        train, val = scan_tinyimagenet(root)
        assert train.classes == sorted(wnids) and val.classes == sorted(wnids)
        assert len(train) == 9 and np.bincount(train.labels).tolist() == [3, 3, 3]
        assert all(Path(train.path(i)).parent.parent.name == train.classes[train.labels[i]] for i in range(9))
    # val labels follow val_annotations.txt, files stay in val/images
    lines = (top / "val" / "val_annotations.txt").read_text().splitlines()
    expected = {f: sorted(wnids).index(w) for f, w, *_ in (ln.split("\t") for ln in lines)}
    got = {Path(val.path(i)).name: int(val.labels[i]) for i in range(len(val))}
    assert got == expected and all(Path(val.path(i)).parent == top / "val" / "images" for i in range(len(val)))


def test_tinyimagenet_loaders(tmp_path):
    write_tinyimagenet_folder(tmp_path)
    train, test, k, names = build_loaders(
        cfg(tmp_path, "tinyimagenet", padding_mode="zeros", batch_size=3, test_batch_size=6), seed=0, device="cpu"
    )
    assert k == 3 and names == sorted(names)
    x, _ = next(iter(train))
    assert x.shape == (3, 3, 64, 64)
    xt, yt = collect(test)
    assert xt.shape == (6, 3, 64, 64) and sorted(yt.tolist()) == [0, 0, 1, 1, 2, 2]
    # test transform is the identity on 64x64 images (normalisation only)
    _, val = scan_tinyimagenet(tmp_path)
    raw = torch.from_numpy(np.asarray(Image.open(val.path(0)).convert("RGB"), dtype=np.float32).transpose(2, 0, 1))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(xt[0], (raw / 255 - mean) / std, atol=1e-5, rtol=0)


def test_tiny_train_transform_is_a_padded_shifted_crop():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    src = np.asarray(img)
    padded = np.pad(src, ((4, 4), (4, 4), (0, 0)))
    t = TinyTrainTransform(64, pad=4, padding_mode="zeros", flip=True)
    for i in range(20):
        out = t(img, np.random.default_rng(i))
        assert out.shape == (64, 64, 3)
        draws = np.random.default_rng(i)  # the draw order: row, column, then the flip coin (1: flipped)
        top, left, flipped = int(draws.integers(0, 9)), int(draws.integers(0, 9)), draws.integers(0, 2) == 1
        window = padded[top : top + 64, left : left + 64]
        assert np.array_equal(out, window[:, ::-1] if flipped else window), i
    assert np.array_equal(TinyTrainTransform(64, pad=0, flip=False)(img, np.random.default_rng(0)), src)
    assert np.array_equal(ResizeCenterCropTransform(64, 64)(img), src)


# -------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n", [0, 1, 5, 6, 7])
def test_shard_sampler_covers_each_index_once(n):
    for world in (1, 2, 3):
        idx = [i for r in range(world) for i in ShardSampler(n, r, world)]
        assert sorted(idx) == list(range(n))
        assert sum(len(ShardSampler(n, r, world)) for r in range(world)) == n


def test_rank_and_world_come_from_the_process_group_when_there_is_one(monkeypatch):
    assert dist_rank_world() == (0, 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    assert dist_rank_world() == (2, 3)


def test_each_seed_epoch_and_index_has_its_own_augmentation_stream():
    first = sample_generator(1, 0, 5).integers(0, 2**31, 4).tolist()
    assert sample_generator(1, 0, 5).integers(0, 2**31, 4).tolist() == first  # a pure function of the three
    for other in ((2, 0, 5), (1, 1, 5), (1, 0, 6), (2**32 + 1, 0, 5)):
        drawn = sample_generator(*other).integers(0, 2**31, 4).tolist()
        assert (drawn == first) == (other == (2**32 + 1, 0, 5)), other  # seeds are taken modulo 2**32


def test_a_training_sample_is_transformed_with_the_stream_of_its_seed_epoch_and_index(imagenet_folder):
    """Sample ``index`` of pass ``epoch`` is augmented from ``sample_generator(seed, epoch, index)``, the three in
    that order (seed 1, pass 4: a swap of seed and pass would draw another crop)."""
    train, _, _, _ = build_loaders(cfg(imagenet_folder), seed=0, device="cpu")
    split, transform = train.dataset.split, train.dataset.transform
    dataset = FolderDataset(split, transform, train=True, seed=1)
    x, label, error = dataset[(4, 2)]
    assert error is None and label == int(split.labels[2])
    expected = transform(dataset.load(2), sample_generator(1, 4, 2)).transpose(2, 0, 1)
    assert np.array_equal(x.numpy(), expected)
    assert not np.array_equal(x.numpy(), transform(dataset.load(2), sample_generator(4, 1, 2)).transpose(2, 0, 1))


def test_shard_sampler_defaults_to_the_whole_range_and_refuses_a_rank_outside_the_world():
    assert list(ShardSampler(4)) == [0, 1, 2, 3] and len(ShardSampler(4)) == 4
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match=f"rank {rank} is outside world size {world}"):
            ShardSampler(4, rank, world)


def test_a_test_split_asked_for_views_gives_each_view_the_same_images(imagenet_folder):
    """A FolderDataset that is not training decodes one view; the loader hands it out ``views`` times."""
    _, test, _, _ = build_loaders(cfg(imagenet_folder), seed=0, device="cpu")
    loader = FolderLoader(FolderDataset(test.dataset.split, test.dataset.transform, train=False, views=3), 4)
    xs, y = next(iter(loader))
    x, y1 = next(iter(test))
    assert isinstance(xs, list) and len(xs) == 3 and torch.equal(y, y1)
    assert all(torch.equal(v, x) for v in xs)


def test_in_memory_folder_serves_the_streaming_test_batches(tmp_path, caplog):
    data = write_class_folder(tmp_path / "data")
    common = {"dataset": "folder", "root": str(data), "image_size": 16, "resize": 20, "workers": 0}
    common.update({"train_crop": "pad_crop", "pad": 2, "batch_size": 8, "test_batch_size": 5, "pin_memory": False})
    streamed = build_folder_loaders(DataConfig(**common), 0, "cpu", rank=0, world_size=1)
    with caplog.at_level(logging.INFO, logger="okd"):
        held = build_folder_loaders(DataConfig(**common, in_memory=True), 0, "cpu", rank=0, world_size=1)
    assert "data.in_memory: 0.0 MiB of uint8 images on cpu" in caplog.text  # 36 images of 3 x 16 x 16
    assert isinstance(held[0], DeviceLoader) and held[2:] == streamed[2:]
    for (xa, ya), (xb, yb) in zip(streamed[1], held[1], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x, _ = next(iter(held[0]))
    assert x.shape == (8, 3, 16, 16) and len(held[0]) == 3
    with pytest.raises(ConfigError, match="needs data.train_crop=pad_crop or center"):
        build_folder_loaders(DataConfig(**{**common, "train_crop": "random_resized"}, in_memory=True), 0, "cpu")


def _signatures(x: torch.Tensor, y: torch.Tensor) -> list[tuple]:
    return sorted((int(label), round(float(img.double().sum()), 3)) for img, label in zip(x, y, strict=True))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_evaluation_is_exact(imagenet_folder, world):
    """Every validation image is evaluated exactly once across ranks (no padding, no drop)."""
    _, ref_test, _, _ = build_folder_loaders(cfg(imagenet_folder, test_batch_size=3), 0, "cpu", rank=0, world_size=1)
    ref = _signatures(*collect(ref_test))
    parts, total = [], 0
    for rank in range(world):
        _, test, _, _ = build_folder_loaders(
            cfg(imagenet_folder, batch_size=6, test_batch_size=3), 0, "cpu", rank=rank, world_size=world
        )
        x, y = collect(test)
        total += len(y)
        assert len(y) == test.num_samples and test.dataset_size == 6
        parts += _signatures(x, y)
    assert total == 6 and sorted(parts) == ref


def test_sharded_training_batches_union_to_the_single_process_batch(imagenet_folder):
    single, _, _, _ = build_folder_loaders(cfg(imagenet_folder, batch_size=4), 7, "cpu", rank=0, world_size=1)
    ranks = [
        build_folder_loaders(cfg(imagenet_folder, batch_size=4), 7, "cpu", rank=r, world_size=2)[0] for r in range(2)
    ]
    assert [len(r) for r in ranks] == [3, 3] and (ranks[0].batch_size, ranks[0].rank_batch_size) == (4, 2)
    for loader in (single, *ranks):
        loader.set_epoch(2)
    for full, part0, part1 in zip(single, *ranks, strict=True):
        assert _signatures(*full) == sorted(_signatures(*part0) + _signatures(*part1))


def test_shard_after_build_as_the_trainer_does(imagenet_folder):
    """``loader.shard(rank, world)`` on a loader built for one process equals building it for that rank."""
    train, test, _, _ = build_folder_loaders(cfg(imagenet_folder, test_batch_size=5), 0, "cpu")
    assert (train.rank, train.world_size, len(train), len(test)) == (0, 1, 3, 2)
    train.shard(1, 2)
    test.shard(1, 2)
    train.shard(1, 2)  # idempotent
    built, built_test, _, _ = build_folder_loaders(
        cfg(imagenet_folder, test_batch_size=5), 0, "cpu", rank=1, world_size=2
    )
    assert (len(train), train.num_samples, test.rank_batch_size, len(test)) == (3, 6, 3, 1)
    for a, b in ((train, built), (test, built_test)):
        xa, ya = collect(a)
        xb, yb = collect(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ConfigError, match="divisible by the 3 processes"):
        train.shard(0, 3)
    with pytest.raises(ConfigError, match="divisible by the 3 processes"):
        build_folder_loaders(cfg(imagenet_folder, batch_size=4), 0, "cpu", rank=0, world_size=3)


def test_drop_last_with_too_few_images(imagenet_folder):
    with pytest.raises(DataError, match="fewer than one batch"):
        build_loaders(cfg(imagenet_folder, batch_size=16, drop_last=True), seed=0, device="cpu")


# ------------------------------------------------------------------------------------------------ errors
def test_missing_and_malformed_folders(tmp_path, imagenet_folder):
    layout = r"must hold train/ and val/ .*\(root/train/n01440764/\*\.JPEG, .*not downloaded"
    with pytest.raises(DataError, match=layout):
        build_loaders(cfg(tmp_path / "nowhere"), seed=0, device="cpu")
    for present in ("train", "val"):  # either folder alone is refused the same way
        half = copy_of(imagenet_folder, tmp_path / f"only-{present}")
        shutil.rmtree(half / ("val" if present == "train" else "train"))
        with pytest.raises(DataError, match=layout):
            build_loaders(cfg(half), seed=0, device="cpu")
    root = copy_of(imagenet_folder, tmp_path)
    (root / "train" / "n99999999").mkdir()
    with pytest.raises(DataError, match=r"1 of 4 class folders .* hold no image.*n99999999"):
        scan_imagenet(root)
    (root / "train" / "n99999999").rmdir()
    shutil.rmtree(root / "val" / IMAGENET_CLASSES[2])
    with pytest.raises(DataError, match=r"2 class folders, but train/ has 3 classes; missing: \[n01484850\]"):
        scan_imagenet(root)
    flat = tmp_path / "flat"
    shutil.copytree(imagenet_folder / "train", flat / "train")
    (flat / "val").mkdir()
    shutil.copy(next((imagenet_folder / "val").rglob("*.JPEG")), flat / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataError, match="no class folders.*1 loose images"):
        scan_imagenet(flat)


def test_tinyimagenet_errors(tmp_path):
    with pytest.raises(DataError, match="not a TinyImageNet-200 folder"):
        scan_tinyimagenet(tmp_path)
    top = write_tinyimagenet_folder(tmp_path)
    ann = top / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text(good + "val_99.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations.txt:7: class 'n00000000' is not in wnids.txt"):
        scan_tinyimagenet(tmp_path)
    ann.write_text(good + "garbage\n")
    with pytest.raises(DataError, match=r":7: expected"):
        scan_tinyimagenet(tmp_path)
    ann.write_text(good)
    (top / "wnids.txt").write_text((top / "wnids.txt").read_text() + "n11111111\n")
    with pytest.raises(DataError, match=r"but wnids.txt has 4 classes; missing: \[n11111111\]"):
        scan_tinyimagenet(tmp_path)


def test_unreadable_image_fails_with_its_path_or_is_skipped(tmp_path, imagenet_folder, caplog):
    root = copy_of(imagenet_folder, tmp_path)
    bad = root / "train" / IMAGENET_CLASSES[1] / "zz_broken.JPEG"
    bad.write_bytes(b"this is not a jpeg")
    train, _, _, _ = build_loaders(cfg(root), seed=0, device="cpu")
    with pytest.raises(DataError, match=r"cannot read image .*zz_broken\.JPEG.*data\.skip_unreadable=true"):
        collect(train)
    for workers in (0, 2):
        train, _, _, _ = build_loaders(cfg(root, skip_unreadable=True, workers=workers), seed=0, device="cpu")
        with caplog.at_level(logging.WARNING, logger="okd"):
            x, y = collect(train)
        assert len(y) == 12 and train.skipped == 1 and x.shape[0] == 12
        assert "skipped 1 unreadable image" in caplog.text and "zz_broken.JPEG" in caplog.text
        caplog.clear()


def test_folder_loader_needs_rank_and_world_together(imagenet_folder):
    train, _ = scan_imagenet(imagenet_folder)
    ds = FolderDataset(train, ResizeCenterCropTransform(8, 8), train=False)
    with pytest.raises(ValueError, match="rank and world_size"):
        FolderLoader(ds, 2, rank=0)
    loader = FolderLoader(ds, 5)  # no process group: rank 0 of 1
    assert (loader.rank, loader.world_size, len(loader)) == (0, 1, 3)


def test_workers_default_to_what_the_machine_has(imagenet_folder, monkeypatch):
    """``data.workers`` unset: min(8, usable cores - 1), 0 (the training process loads) on one core; the packaged
    examples leave it unset, so none of them asks a small machine for more workers than it has."""
    from okd.configs import packaged_configs, resolve_config
    from okd.data.folder import loader as loader_mod
    from okd.data.folder.loader import default_workers

    assert [default_workers(c) for c in (1, 2, 3, 4, 9, 64)] == [0, 1, 2, 3, 8, 8]
    assert DataConfig().workers is None
    monkeypatch.setattr(loader_mod.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    train, _ = scan_imagenet(imagenet_folder)
    ds = FolderDataset(train, ResizeCenterCropTransform(8, 8), train=False)
    assert FolderLoader(ds, 5, workers=None).workers == 1 and FolderLoader(ds, 5, workers=0).workers == 0
    examples = [n for n in packaged_configs() if n.startswith("examples/")]
    assert examples and all("workers" not in resolve_config(n).read_text() for n in examples)


# ------------------------------------------------------------------------------------------ edge cases
def test_a_dataset_that_is_not_an_image_folder_is_refused(tmp_path):
    root = write_class_folder(tmp_path / "data", train_per_class=1, val_per_class=1)
    listed = r"\(imagenet, tinyimagenet, folder\)"
    with pytest.raises(DataError, match=r"data\.dataset='cifar100' is not an image-folder dataset " + listed):
        build_transforms(DataConfig(dataset="cifar100"), train=True)
    with pytest.raises(DataError, match=r"data\.dataset='cifar10' is not an image-folder dataset " + listed):
        scan("cifar10", root)
    assert isinstance(
        build_transforms(DataConfig(dataset="folder", image_size=8), train=False), ResizeCenterCropTransform
    )
    train, val = scan("folder", root)
    assert (len(train), len(val), train.classes) == (3, 3, ["circle", "square", "zigzag"])


def _val_loader(root: Path, batch_size: int, **kw) -> FolderLoader:
    _, val = scan_train_val(root)
    return FolderLoader(FolderDataset(val, ResizeCenterCropTransform(8, 8), train=False), batch_size, **kw)


@pytest.mark.parametrize("batch_size", [0, -2])
def test_folder_loader_refuses_a_batch_size_below_one(tmp_path, batch_size):
    root = write_class_folder(tmp_path / "data", train_per_class=1, val_per_class=1)
    with pytest.raises(ValueError, match=f"batch_size must be positive, got {batch_size}"):
        _val_loader(root, batch_size)
    assert [len(y) for _, y in _val_loader(root, 1)] == [1, 1, 1]


def test_folder_loader_refuses_a_rank_outside_its_world(tmp_path):
    root = write_class_folder(tmp_path / "data", train_per_class=1, val_per_class=1)
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match=f"rank {rank} outside world of size {world}"):
            _val_loader(root, 2, rank=rank, world_size=world)
    loader = _val_loader(root, 2, rank=1, world_size=2)  # the last rank of the world
    assert (loader.rank, loader.world_size, [y.tolist() for _, y in loader]) == (1, 2, [[1]])
    with pytest.raises(ValueError, match="rank 3 outside world of size 3"):
        loader.shard(3, 3)
    assert (loader.rank, loader.world_size) == (1, 2)  # unchanged by the refused shard


def test_a_batch_emptied_by_unreadable_images_is_left_out(tmp_path, caplog):
    """The val split in order, batches of 4: every image of the first class unreadable leaves batch 0 empty."""
    root = write_class_folder(tmp_path / "data", train_per_class=1, val_per_class=4)
    for path in (root / "val" / "circle").glob("*.png"):
        path.write_text("not an image")
    loader = _val_loader(root, 4, skip_unreadable=True)
    with caplog.at_level(logging.WARNING, logger="okd"):
        batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 8, 8), (4, 3, 8, 8)]
    assert [y.tolist() for _, y in batches] == [[1, 1, 1, 1], [2, 2, 2, 2]]
    assert loader.skipped == 4 and "skipped 4 unreadable image(s) in this pass on rank 0" in caplog.text


def _train_loader(root: Path, rank: int, world: int, drop_single: bool) -> FolderLoader:
    train, _ = scan_train_val(root)
    ds = FolderDataset(train, ResizeCenterCropTransform(8, 8), train=True, seed=3)
    loader = FolderLoader(ds, 2 * world, rank=rank, world_size=world, skip_unreadable=True)
    loader.drop_single = drop_single
    return loader


def test_a_training_batch_left_with_one_readable_image(tmp_path, caplog):
    """drop_single (BatchNorm): on several ranks such a batch fails (skipping it alone would hang the others); on
    one rank it is left out and logged; without drop_single it is trained on."""
    root = write_class_folder(tmp_path / "data", classes=("circle", "square"), train_per_class=4, val_per_class=1)
    loader = _train_loader(root, 0, 2, drop_single=True)
    loader.sampler.set_epoch(0)
    first = list(loader.sampler)[0]  # rank 0's first batch: positions 0 and 2 of the shuffled pass
    bad = Path(loader.dataset.split.path(first))
    bad.write_text("not an image")
    with pytest.raises(
        DataError,
        match=rf"a training batch on rank 0 holds a single readable image .*first: .*{bad.parent.name}.{bad.name}"
        r".*BatchNorm layers cannot train on one image",
    ):
        list(loader)
    assert [len(y) for _, y in _train_loader(root, 0, 2, drop_single=False)] == [1, 2]
    assert [len(y) for _, y in _train_loader(root, 1, 2, drop_single=True)] == [2, 2]  # the other rank's batches
    one = _train_loader(root, 0, 1, drop_single=True)  # batches of 2: positions 0 and 1 of the same pass
    with caplog.at_level(logging.WARNING, logger="okd"):
        assert [len(y) for _, y in one] == [2, 2, 2]
    assert "skipped 1 unreadable image(s)" in caplog.text and "1 batch(es) left with a single image" in caplog.text
    assert [len(y) for _, y in _train_loader(root, 0, 1, drop_single=False)] == [1, 2, 2, 2]


def test_tinyimagenet_annotations_skip_blank_lines_and_must_list_an_image(tmp_path):
    top = write_tinyimagenet_folder(tmp_path)
    _, want = scan_tinyimagenet(top)
    ann = top / "val" / "val_annotations.txt"
    lines = ann.read_text().splitlines(keepends=True)
    ann.write_text("\n" + lines[0] + "   \n\t\n" + "".join(lines[1:]) + "\n")
    _, got = scan_tinyimagenet(top)
    assert got.paths.tolist() == want.paths.tolist() and got.labels.tolist() == want.labels.tolist()
    ann.write_text("\n  \n")
    with pytest.raises(DataError, match=r"val_annotations\.txt lists no image"):
        scan_tinyimagenet(top)


def test_tinyimagenet_wnids_listing_a_class_twice_is_refused(tmp_path):
    top = write_tinyimagenet_folder(tmp_path)
    (top / "wnids.txt").write_text("n02124075\nn01443537\nn04067472\nn01443537\n")
    with pytest.raises(DataError, match=r"wnids\.txt lists a class twice"):
        scan_tinyimagenet(top)


def _class_folder_val(top: Path) -> None:
    """Rewrite ``top/val`` as one folder per class (val/<wnid>/images/*.JPEG), two images each."""
    wnids = (top / "wnids.txt").read_text().split()
    shutil.rmtree(top / "val")
    for w in wnids:
        for i in range(2):
            dst = top / "val" / w / "images" / f"v_{i}.JPEG"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(top / "train" / w / "images" / f"{w}_{i}.JPEG", dst)


def test_tinyimagenet_val_may_be_one_folder_per_class(tmp_path):
    top = write_tinyimagenet_folder(tmp_path)
    _class_folder_val(top)
    _, val = scan_tinyimagenet(top)
    assert val.classes == ["n01443537", "n02124075", "n04067472"] and val.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert [Path(val.path(i)).parent.parent.name for i in range(6)] == [val.classes[c] for c in (0, 0, 1, 1, 2, 2)]


@pytest.mark.parametrize("val", ["images only", "empty", "missing"])
def test_tinyimagenet_val_in_neither_layout_is_refused(tmp_path, val):
    """No val_annotations.txt, and val/ holds only images/ (or nothing, or is missing): no labels to read."""
    top = write_tinyimagenet_folder(tmp_path)
    (top / "val" / "val_annotations.txt").unlink()
    if val != "images only":
        shutil.rmtree(top / "val")
    if val == "empty":
        (top / "val").mkdir()
    with pytest.raises(DataError, match=r"val: neither val_annotations\.txt with images/ nor one folder per class"):
        scan_tinyimagenet(top)


def test_center_crop_zero_pads_an_image_smaller_than_the_crop():
    """torchvision's CenterCrop: the padding is split with the odd pixel after (bottom, right); offsets round."""

    def image(h, w):
        return np.arange(1, h * w + 1, dtype=np.uint8).reshape(h, w, 1)

    def rows(out):
        return out[..., 0].tolist()

    # 3 x 2 to 6: 3 rows of padding (1 above, 2 below), 4 columns (2 each side)
    assert rows(_center_crop(image(3, 2), 6)) == [
        [0, 0, 0, 0, 0, 0],
        [0, 0, 1, 2, 0, 0],
        [0, 0, 3, 4, 0, 0],
        [0, 0, 5, 6, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ]
    # 2 x 3 to 4: 1 column of padding, on the right
    assert rows(_center_crop(image(2, 3), 4)) == [[0, 0, 0, 0], [1, 2, 3, 0], [4, 5, 6, 0], [0, 0, 0, 0]]
    # 5 x 2 to 4: rows cropped (offset round(0.5) = 0), columns padded
    assert rows(_center_crop(image(5, 2), 4)) == [[0, 1, 2, 0], [0, 3, 4, 0], [0, 5, 6, 0], [0, 7, 8, 0]]
    # the boundaries: the image's own size is itself; one pixel more pads one row and column after it
    assert rows(_center_crop(image(3, 3), 3)) == rows(image(3, 3))
    assert rows(_center_crop(image(3, 3), 4)) == [[1, 2, 3, 0], [4, 5, 6, 0], [7, 8, 9, 0], [0, 0, 0, 0]]
    assert rows(_center_crop(image(4, 4), 3)) == [[1, 2, 3], [5, 6, 7], [9, 10, 11]]


def test_resize_shorter_leaves_an_image_whose_shorter_side_is_the_size_alone():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8))  # 20 wide, 30 high
    assert _resize_shorter(img, 20) is img
    assert _resize_shorter(img, 21).size == (21, 31) and _resize_shorter(img, 19).size == (19, 28)


def test_tiny_train_transform_refuses_an_unknown_padding_mode():
    with pytest.raises(ValueError, match="padding_mode must be zeros or reflect, got 'edge'"):
        TinyTrainTransform(8, padding_mode="edge")
    src = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    padded = np.pad(src, ((2, 2), (2, 2), (0, 0)), mode="reflect")
    draw = np.random.default_rng(0)
    top, left = int(draw.integers(0, 5)), int(draw.integers(0, 5))  # the transform's own first two draws
    assert (top, left) != (2, 2)  # a window that holds padding
    out = TinyTrainTransform(8, pad=2, padding_mode="reflect", flip=False)(
        Image.fromarray(src), np.random.default_rng(0)
    )
    assert np.array_equal(out, padded[top : top + 8, left : left + 8])


def test_a_class_folder_split_that_does_not_exist_is_named():
    missing = Path("/nonexistent/okd/val")
    with pytest.raises(DataError, match=r"^folder val: folder '/nonexistent/okd/val' does not exist$"):
        scan_class_folders(missing, missing.parent, what="folder val")


def test_a_limit_of_the_whole_split_or_more_keeps_every_index():
    labels = np.array([2, 0, 1, 0])
    assert balanced_prefix(labels, 4).tolist() == [0, 1, 2, 3]
    assert balanced_prefix(labels, 9).tolist() == [0, 1, 2, 3]
    assert balanced_prefix(labels, 3).tolist() == [0, 1, 2]


def test_folder_loaders_need_rank_and_world_size_together(tmp_path):
    root = write_class_folder(tmp_path / "data", train_per_class=1, val_per_class=1)
    folder = cfg(root, "folder", image_size=8)
    for given in ({"rank": 0}, {"world_size": 2}):
        with pytest.raises(ValueError, match=r"^give both rank and world_size, or neither$"):
            build_folder_loaders(folder, 0, "cpu", **given)


def test_named_view_augmentations_are_refused_for_image_folders(tmp_path):
    """Per-view augmentations exist for CIFAR only: a folder run asked for them is refused, naming them."""
    refused = (
        r"^named per-view augmentations \(flip, crop\) are implemented for CIFAR only, not for data\.dataset=folder; "
        r"leave the method's views out to give every view the standard crop$"
    )
    with pytest.raises(DataError, match=refused):
        build_loaders(cfg(tmp_path, "folder", image_size=8), 0, "cpu", views=2, view_augs=["flip", "crop"])


def test_workers_default_from_the_cpu_count_where_there_is_no_affinity_mask(monkeypatch):
    """macOS and Windows have no sched_getaffinity: the CPU count is used, one core when it is unknown."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert default_workers() == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert default_workers() == 0


def test_image_folders_without_pillow_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL fails as where it is not installed
    refused = r"^ImageNet-style folders need Pillow: pip install 'okd\[images\]' \(or pillow\)$"
    with pytest.raises(DataError, match=refused):
        _pil()
