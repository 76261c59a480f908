"""What a run says while it trains and when it ends: epoch lines, durations, ETAs and the closing summary."""

from __future__ import annotations

from pathlib import Path


def ordered_heads(heads: list[str], deployed: str | None) -> list[str]:
    """``heads`` sorted, the deployed head first."""
    rest = sorted(h for h in heads if h != deployed)
    return ([deployed] if deployed in heads else []) + rest


def epoch_line(
    row: dict[str, float],
    heads: list[str],
    epochs: int,
    deployed: str | None = None,
    eta_s: float | None = None,
    labels: dict[str, str] | None = None,
) -> str:
    """One epoch's log line: loss, every head's top-1 (the deployed head first, marked ``*``; a head of a cohort
    of different networks with its network, ``net1(wrn16_2)``), times, run ETA."""
    shown = [h for h in ordered_heads(heads, deployed) if f"test/{h}/top1" in row]
    accs = " ".join(f"{'*' if h == deployed else ''}{head_label(h, labels)}={row[f'test/{h}/top1']:.2f}" for h in shown)
    scores = f"top1 [{accs}]" if shown else "not scored (train.eval_every)"
    times = f"train {row['time/epoch_s']:.1f}s ({row['time/images_per_s']:.0f} img/s)"
    if "time/eval_s" in row:
        times += f" + eval {row['time/eval_s']:.1f}s"
    eta = f", run ETA {format_duration(eta_s)}" if eta_s is not None else ""
    return f"epoch {int(row['epoch'])}/{epochs}: loss={row.get('train/loss', float('nan')):.4f} {scores} {times}{eta}"


def head_label(head: str, labels: dict[str, str] | None, sep: str = "") -> str:
    """``head`` with its network when ``labels`` (``Method.head_networks``) names one: ``net1(wrn16_2)``
    (``sep=" "``: ``net1 (wrn16_2)``)."""
    network = (labels or {}).get(head)
    return f"{head}{sep}({network})" if network else head


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def run_eta(epoch_seconds: list[float], remaining_epochs: int) -> float | None:
    """Seconds left for ``remaining_epochs`` at the mean pace of the epochs timed so far (None before any
    epoch is timed, and when none remains)."""
    if not epoch_seconds or remaining_epochs <= 0:
        return None
    return sum(epoch_seconds) / len(epoch_seconds) * remaining_epochs


def live_eta(paces: list[float], epochs_after: int, step_s: float, steps_left: int, steps_total: int) -> float:
    """Seconds left in the run during an epoch: this epoch's remaining steps at the current step time, then
    ``epochs_after`` epochs at the mean pace so far (before any epoch is timed: this epoch's training pace)."""
    pace = sum(paces) / len(paces) if paces else step_s * steps_total
    return step_s * steps_left + pace * epochs_after


def run_summary(
    head: str,
    top1: float,
    epoch: int | None,
    best: tuple[float, int] | None,
    deploy_path: str | Path | None,
    wall_s: float,
) -> str:
    """The closing lines of ``okd train`` and ``okd test``: what is deployed, how good it is, where it is."""
    at = f" at epoch {epoch}" if epoch is not None else ""
    lines = [f"deployed head: {head}, top-1 {top1:.2f}{at}"]
    if best is not None:
        lines.append(f"best top-1 of {head}: {best[0]:.2f} at epoch {best[1]} (selected on test: optimistic)")
    lines.append(f"deploy.pt: {deploy_path if deploy_path is not None else '(none)'}")
    lines.append(f"wall time: {format_duration(wall_s)}")
    return "\n".join(lines)
