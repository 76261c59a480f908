"""One evaluation pass that scores every head of a method (top-1/top-5) plus its oracle metrics."""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from okd.engine.distributed import DistContext, all_reduce_sum
from okd.methods.base import Method


@torch.no_grad()
def evaluate(
    method: Method, loader, max_batches: int | None = None, dist: DistContext | None = None, progress: bool = False
) -> dict[str, float]:
    """Return ``{'<head>/top1': %, '<head>/top5': %, '<oracle>/top1': %}`` over the loader's split.

    ``progress`` shows a tqdm bar over the batches (on stderr, removed when done). Counts are accumulated on
    the device and read once at the end (no per-batch host sync); under DDP every rank scores its shard and
    the counts are summed across ranks. A row of logits holding a NaN or inf is never counted as correct
    (``topk`` would rank the NaN first and score it as a class).
    """
    was_training = method.training
    method.eval()
    correct1: dict[str, Tensor] = {}
    correct5: dict[str, Tensor] = {}
    oracle = method.oracle_groups()
    oracle_correct: dict[str, Tensor] = {}
    total = 0
    batches = loader
    if progress:
        from tqdm import tqdm

        n = len(loader) if max_batches is None else min(len(loader), max_batches)
        batches = tqdm(loader, total=n, desc="eval", leave=False, file=sys.stderr)
    for b, (images, labels) in enumerate(batches):
        if max_batches is not None and b >= max_batches:
            break
        outputs = method.eval_outputs(images)
        hit1: dict[str, Tensor] = {}
        for head, logits in outputs.items():
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            match = top.eq(labels.view(-1, 1)) & logits.isfinite().all(dim=1, keepdim=True)  # NaN/inf: wrong
            hit1[head] = match[:, 0]
            correct1[head] = correct1.get(head, 0) + match[:, 0].sum()
            correct5[head] = correct5.get(head, 0) + match.any(dim=1).sum()
        for name, heads in oracle.items():
            any_hit = torch.stack([hit1[h] for h in heads]).any(dim=0)
            oracle_correct[name] = oracle_correct.get(name, 0) + any_hit.sum()
        total += labels.shape[0]
    method.train(was_training)
    heads, oracles = list(correct1), list(oracle_correct)
    device = next(method.parameters()).device
    counts = [correct1[h] for h in heads] + [correct5[h] for h in heads] + [oracle_correct[o] for o in oracles]
    packed = torch.tensor([float(total)], device=device)
    if counts:
        packed = torch.cat([torch.stack(counts).to(device=device, dtype=torch.float64), packed.double()])
    packed = all_reduce_sum(packed.double(), dist or DistContext()).tolist()
    total = packed[-1]
    if total == 0:
        return {}
    result: dict[str, float] = {}
    n = len(heads)
    for i, head in enumerate(heads):
        result[f"{head}/top1"] = 100.0 * packed[i] / total
        result[f"{head}/top5"] = 100.0 * packed[n + i] / total
    for j, name in enumerate(oracles):
        result[f"{name}/top1"] = 100.0 * packed[2 * n + j] / total
    return result


def is_scored(epoch: int, train_cfg) -> bool:
    """Whether 1-based ``epoch`` is evaluated on the test split: every ``train.eval_every`` epochs, and the
    last epoch (``train.epochs``) always."""
    return epoch % train_cfg.eval_every == 0 or epoch >= train_cfg.epochs


def last_scored(history: list[dict]) -> dict | None:
    """The last row of a run's history that holds test scores (None before any epoch is scored)."""
    return next((row for row in reversed(history) if any(k.startswith("test/") for k in row)), None)
