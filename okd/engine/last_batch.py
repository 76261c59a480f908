"""A last training batch of one image, left out of every epoch for networks with BatchNorm.

When the training split is not a multiple of the batch, the last batch of a pass holds the rest; when that rest
is one image (on some rank), a BatchNorm layer in training mode either fails (``BatchNorm1d`` on pooled features,
as in ONE's gate, or ``BatchNorm2d`` on 1 x 1 maps: "Expected more than 1 value per channel") or normalises the
image by its own statistics. Training would crash after a full epoch, with nothing saved; the reference codes,
run with ``drop_last=False``, crash the same way on such data. So for a training graph with any batch-statistics
module, that one-image batch is left out (a different image each epoch, as the order is shuffled), and the log
says so. ``data.drop_last`` keeps its default; the decision is a pure function of the split size, the batch
and the process count, so a resumed run makes it again, identically.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from okd.log import log


def has_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` holds a BatchNorm layer (any dimension, synchronised or not)."""
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def drop_single_image_batches(method: nn.Module, loader, announce: bool = True) -> bool:
    """Make ``loader`` (the training loader) leave out batches of one image when ``method`` has BatchNorm.

    Returns whether the last batch of each epoch is left out; ``announce`` logs it (the main process).
    """
    if not has_batch_statistics(method):
        return False
    loader.drop_single = True  # the folder loader also skips a batch that unreadable images shrank to one image
    if not loader.single_image_tail():
        return False
    before = len(loader) + 1
    if announce:
        log.warning(
            f"the last training batch of each epoch would hold a single image (batch {before} of {before}, "
            f"data.batch_size={loader.batch_size}); the network has BatchNorm layers, which cannot train on one "
            "image, so that batch is left out of every epoch (one image, a different one each epoch). To train on "
            "every image, choose data.batch_size (or data.limit_train) so that the last batch holds two or more"
        )
    return True
