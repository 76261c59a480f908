"""Class-folder image datasets, decoded with Pillow in DataLoader workers.

``data.dataset: folder`` reads any ``root/train/<class>/**/<image>`` and ``root/val/<class>/**/<image>``
(any number of classes, any size and format Pillow reads; ``val/`` must have the same class folders).
Transforms: ``data.train_crop`` random_resized (RandomResizedCrop ``data.image_size``, flip), pad_crop (Resize
``image_size``, RandomCrop with ``data.pad``, flip) or center (Resize, CenterCrop, flip); test: Resize
``data.resize`` (default ``image_size / 0.875``, ImageNet's 256/224) -> CenterCrop ``image_size``;
normalisation ``data.mean``/``data.std`` (ImageNet's by default) or, with ``data.compute_stats``, the
training split's own statistics.

Modules: :mod:`.scan` (folders -> :class:`FolderSplit`, with the errors), :mod:`.transforms`,
:mod:`.dataset`, :mod:`.samplers`, :mod:`.loader` (:class:`FolderLoader`), :mod:`.presets` (ImageNet and
TinyImageNet: their layouts and fixed recipes) and :mod:`.builder` (:func:`build_folder_loaders`).

Preset layouts (nothing has to be moved):
- ImageNet: ``root/train/<class>/**/*.JPEG`` and ``root/val/<class>/**/*.JPEG`` (the usual class-folder
  layout; the raw flat ``val/`` must first be sorted into class folders, e.g. with the common valprep.sh).
- TinyImageNet-200: ``root`` is ``tiny-imagenet-200/`` (or its parent): ``wnids.txt``,
  ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``
  (``file<TAB>wnid<TAB>box...``). A ``val/`` already sorted into ``val/<wnid>/`` folders is accepted too.
Class indices follow the sorted class (wnid) names, as torchvision's ``ImageFolder`` on ``train/``.

Transforms (the FFSD ImageNet and CMFF TinyImageNet recipes, ``docs/methods.md``), all with Pillow bilinear
resampling as torchvision's PIL path:
- ImageNet train: RandomResizedCrop 224 (scale 0.08-1, ratio 3/4-4/3, torchvision's sampling) -> flip.
  Test: Resize 256 (shorter side) -> CenterCrop 224.
- TinyImageNet (CMFF): train Resize 64 (shorter side) -> RandomCrop 64 with ``data.pad`` (4) padding of
  ``data.padding_mode`` (CMFF: zeros) -> flip. Test: Resize 64 -> CenterCrop 64. On the real 64x64 images
  both resizes are the identity; the centre crop only makes non-square images batchable.
Images leave the workers as uint8 and are normalised (ImageNet mean/std by default) on the device.

Randomness: every random draw of sample ``i`` in pass ``epoch`` comes from a generator seeded by
``(seed, epoch, i)``, and the order from ``DistributedSampler(seed=seed)`` with ``set_epoch``, so batches
do not depend on the number of workers, and the union of the ranks' batches is the single-process batch.

Sharding (:meth:`FolderLoader.shard`; default: the initialised process group): ``data.batch_size`` is the
global batch, each rank loads ``batch_size / world`` of it. Training uses ``DistributedSampler(num_replicas=
world, rank=rank, shuffle=True, drop_last=True)`` (equal batch counts on every rank; fewer than ``world``
tail samples are left out of a pass). Evaluation uses :class:`ShardSampler`, ``indices[rank::world]``
without padding, so every sample is evaluated exactly once across ranks (ranks may differ by one sample,
and so by one batch: sum the counts across ranks once, after the pass).
"""

from okd.data.folder.builder import (
    FOLDER_DATASETS,
    build_folder_loaders,
    build_transforms,
    geometry,
    image_size_of,
    preprocessing,
    scan,
    split_statistics,
)
from okd.data.folder.dataset import (
    FolderDataset,
    collate_samples,
)
from okd.data.folder.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FolderLoader,
)
from okd.data.folder.presets import (
    PRESETS,
    Preset,
    scan_imagenet,
    scan_tinyimagenet,
)
from okd.data.folder.samplers import (
    EpochTaggedSampler,
    ShardSampler,
    dist_rank_world,
)
from okd.data.folder.scan import (
    IMG_EXTENSIONS,
    FolderSplit,
    balanced_prefix,
    scan_class_folders,
    scan_train_val,
)
from okd.data.folder.transforms import (
    CenterCropFlipTransform,
    ImageNetTrainTransform,
    ResizeCenterCropTransform,
    TinyTrainTransform,
    _rrc_params,
    sample_generator,
)

__all__ = [
    "CenterCropFlipTransform",
    "EpochTaggedSampler",
    "FOLDER_DATASETS",
    "FolderDataset",
    "FolderLoader",
    "FolderSplit",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "ImageNetTrainTransform",
    "PRESETS",
    "Preset",
    "ResizeCenterCropTransform",
    "ShardSampler",
    "TinyTrainTransform",
    "_rrc_params",
    "balanced_prefix",
    "build_folder_loaders",
    "build_transforms",
    "collate_samples",
    "dist_rank_world",
    "geometry",
    "image_size_of",
    "preprocessing",
    "sample_generator",
    "scan",
    "scan_class_folders",
    "scan_imagenet",
    "scan_tinyimagenet",
    "scan_train_val",
    "split_statistics",
]
