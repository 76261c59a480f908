"""The side-by-side table ``okd bench`` prints."""

from __future__ import annotations

import platform
from collections.abc import Callable

import torch

from okd.bench.env import hardware_line
from okd.bench.rows import FLOPS_NOTE
from okd.bench.timing import BenchReport, PathResult


def format_table(report: BenchReport) -> str:
    """The side-by-side table (okd, reference, okd/reference)."""
    res = {r.path: r for r in report.results}
    okd, ref, eager = res.get("okd"), res.get("reference"), res.get("okd-eager")
    first = report.rows[0] if report.rows else {}
    head = [
        f"okd bench {report.config}: method={report.method} model={report.model} batch={report.batch} "
        f"data={report.data.kind}" + (f" ({report.data.reason})" if report.data.reason else ""),
        f"hardware: {first.get('hardware', hardware_line(report.device))} | device {report.device} | "
        f"torch {torch.__version__} | python {platform.python_version()} | commit {first.get('git_commit', '?')}",
        f"MACs per image: {report.macs.total / 1e6:.1f} M (forward-only {report.macs.no_grad / 1e6:.1f} M); "
        f"{FLOPS_NOTE}",
    ]

    def label(r: PathResult) -> str:
        if r.path == "reference":
            return "reference (fp32, eager)"
        flags = (
            [r.precision] + (["channels_last"] if r.channels_last else []) + (["compile"] if r.compile else ["eager"])
        )
        return f"okd ({', '.join(flags)})"

    metrics: list[tuple[str, Callable[[PathResult], float], str, bool]] = [
        ("images/s (median)", lambda r: r.images_per_s, "{:.1f}", True),
        ("s per 50k epoch", lambda r: r.s_per_epoch, "{:.2f}", False),
        ("peak memory (MB)", lambda r: r.peak_mem_mb, "{:.0f}", False),
        ("TFLOP/s", report.tflops, "{:.4f}", True),
    ]
    cols = [c for c in (okd, eager, ref) if c is not None]
    ratios = [(okd, ref, "okd / reference"), (okd, eager, "compiled / eager")]
    ratios = [(a, b, title) for a, b, title in ratios if a and b]
    header = ["", *[label(c) for c in cols], *[title for _, _, title in ratios]]
    body = []
    for name, get, fmt, _ in metrics:
        line = [name, *[fmt.format(get(c)) for c in cols]]
        for a, b, _ in ratios:
            line.append(f"{get(a) / get(b):.2f}x" if get(b) else "-")
        body.append(line)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt_line = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [*head, "", fmt_line.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt_line.format(*r) for r in body]
    lines.append("")
    for c in cols:
        lines.append(f"{c.path}: {c.description}")
        lines.append(f"  window images/s: {' '.join(f'{v:.1f}' for v in c.window_images_per_s)}")
        if c.syncs is not None:
            lines.append(f"  synchronising CUDA calls in one step: {c.syncs}")
    if okd and ref:
        lines.append(f"speed-up okd/reference: {okd.images_per_s / ref.images_per_s:.2f}x (images/s, same run)")
    if okd and eager:
        lines.append(f"speed-up compiled/eager: {okd.images_per_s / eager.images_per_s:.2f}x (images/s, same run)")
    return "\n".join(lines)
