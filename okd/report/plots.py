"""``okd plot``: training curves of a run from its ``metrics.csv`` (matplotlib, the ``plot`` extra).

Panels: test top-1 and top-5 of every head; the total training loss; one panel per loss component
(``train/<component>/<term>``, e.g. ``student1``: ce, kl, div, sd_div) on a log scale, since terms span many
orders of magnitude (symmetric log where a term is negative); logged statistics (``train/stat/...``); the
learning rate of every group.
"""

from __future__ import annotations

import math
from pathlib import Path

from okd.errors import CheckpointError
from okd.extras import pyplot
from okd.runs.reader import Run


def curve_panels(columns: list[str]) -> list[tuple[str, list[str], str]]:
    """``(title, columns, y-scale)`` of every panel, in display order."""
    panels: list[tuple[str, list[str], str]] = []
    for metric in ("top1", "top5"):
        cols = [c for c in columns if c.startswith("test/") and c.endswith(f"/{metric}")]
        if cols:
            panels.append((f"test {metric} (%)", cols, "linear"))
    if "train/loss" in columns:
        panels.append(("train loss (total)", ["train/loss"], "linear"))
    components: dict[str, list[str]] = {}
    for c in columns:
        parts = c.split("/")
        if c.startswith("train/") and len(parts) >= 3:
            components.setdefault(parts[1], []).append(c)
    for comp, cols in components.items():
        if comp != "stat":
            panels.append((f"train loss terms: {comp}", cols, "log"))
    if "stat" in components:
        panels.append(("train statistics", components["stat"], "linear"))
    lrs = [c for c in columns if c.startswith("lr/")]
    if lrs:
        panels.append(("learning rate", lrs, "log"))
    return panels


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw every curve of ``run_dir/metrics.csv`` into a PNG (default ``run_dir/curves.png``)."""
    run = Run(run_dir)
    run_dir = run.dir
    rows = run.history  # up to the committed epoch
    if not rows:
        raise CheckpointError(f"{run_dir} has no epoch yet")
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    panels = curve_panels(list(dict.fromkeys(k for row in rows for k in row)))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(rows)]
    for ax, (title, cols, scale) in zip(axes.flat, panels, strict=False):
        for c in cols:
            pts = [(e, r[c]) for e, r in zip(epochs, rows, strict=True) if c in r and math.isfinite(r[c])]
            if not pts:
                continue
            label = c.split("/", 1)[1].removesuffix("/top1").removesuffix("/top5")
            if title.startswith("train loss terms"):
                label = c.split("/", 2)[2]
            ax.plot(*zip(*pts, strict=True), marker="o" if len(pts) < 20 else None, ms=3, label=label)
        if scale == "log":  # log when every value is positive, else symmetric log (e.g. a negative diversity term)
            positive = all(r.get(c, 1.0) > 0 for r in rows for c in cols)
            ax.set_yscale("log") if positive else ax.set_yscale("symlog", linthresh=1e-6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(cols) > 6 else 1)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{run_dir.name}: training curves", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(out) if out else run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
