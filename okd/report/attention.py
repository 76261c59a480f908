"""``okd attention``: attention maps of every network of a run on test images (FFSD paper Figs. 2 and 7),
and the cosine similarity between the students' attention maps (as the paper's Table IV compares).

att(F) = channel mean of F² on the deepest tap (the map that feeds global pooling; see
``docs/methods.md#notation-and-shared-blocks``),
upsampled bilinearly to the image size for display. Works for any method whose networks expose
``forward_taps``: FFSD's students and leader, DML's nets, KD's student and teacher, each branch of a
multi-branch method, or the single net of the baseline.

The paper's exact similarity definition is not recoverable from its text; we report, per image, the cosine
between the flattened attention maps (``cosine``) and between the maps with their spatial mean removed
(``centered``, i.e. the Pearson correlation), averaged over ``--similarity-images`` test images. Compare our
numbers across methods, not with the paper's.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okd.data.cifar import SPECS, load_cifar
from okd.data.facts import class_names, normalization
from okd.data.folder import FolderDataset, build_transforms, scan, split_statistics
from okd.engine.run_log import head_label
from okd.errors import ConfigError
from okd.extras import pyplot
from okd.nn.losses import attention_map
from okd.runs.reader import Run, load_run_method


@dataclass
class AttentionResult:
    """What ``okd attention`` computed."""

    figure: Path
    similarity_figure: Path | None
    similarity_csv: Path | None
    names: list[str]
    cosine: np.ndarray  # networks x networks, mean over images
    centered: np.ndarray
    num_images: int

    def table(self) -> str:
        """Pairwise similarities between networks as Markdown."""
        lines = [
            f"Attention-map similarity, mean over {self.num_images} test images "
            "(cosine of the flattened maps; centered = with each map's mean removed).",
            "",
            "| network A | network B | cosine | centered |",
            "|---|---|---|---|",
        ]
        for i, j in itertools.combinations(range(len(self.names)), 2):
            lines.append(f"| {self.names[i]} | {self.names[j]} | {self.cosine[i, j]:.4f} | {self.centered[i, j]:.4f} |")
        return "\n".join(lines)


@torch.no_grad()
def attention_maps(networks: dict[str, nn.Module], images: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per network: att of its deepest tap (B x 1 x h x w) and its logits."""
    maps, logits = {}, {}
    for name, net in networks.items():
        z, taps = net.forward_taps(images)
        maps[name] = attention_map(taps[-1])
        logits[name] = z
    return maps, logits


def similarity(maps: dict[str, Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise per-image cosine (raw and mean-centered) of flattened attention maps, averaged over images; maps
    of different sizes (a cohort of different networks) are first resized bilinearly to the largest."""
    names = list(maps)
    h, w = max(tuple(m.shape[-2:]) for m in maps.values())
    same = {n: m if tuple(m.shape[-2:]) == (h, w) else F.interpolate(m.float(), size=(h, w), mode="bilinear")
            for n, m in maps.items()}  # fmt: skip
    flat = [same[n].flatten(1).double() for n in names]
    n = len(names)
    cos, cen = np.eye(n), np.eye(n)
    for i, j in itertools.combinations(range(n), 2):
        a, b = flat[i], flat[j]
        cos[i, j] = cos[j, i] = F.cosine_similarity(a, b, dim=1, eps=1e-12).mean().item()
        ac, bc = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
        cen[i, j] = cen[j, i] = F.cosine_similarity(ac, bc, dim=1, eps=1e-12).mean().item()
    return cos, cen


def _normalize(images: np.ndarray, mean, std) -> Tensor:
    x = torch.from_numpy(images).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _display(att: Tensor, size: tuple[int, int]) -> np.ndarray:
    """Upsample to ``size`` and scale each map to [0, 1] for display."""
    up = F.interpolate(att.float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(1).values.view(-1, 1, 1)
    hi = up.flatten(1).max(1).values.view(-1, 1, 1)
    return ((up - lo) / (hi - lo).clamp_min(1e-12)).numpy()


def _folder_test_images(data, run_dir: Path, count: int):
    """The first ``count`` validation images of a class-folder run (its test transform, uint8) and its
    normalisation (``deploy.pt``'s, which holds statistics computed with ``data.compute_stats``)."""
    train_split, val = scan(data.dataset, data.root)
    ds = FolderDataset(val, build_transforms(data, train=False), train=False)
    picked = [ds[i] for i in range(min(count, len(ds)))]
    images = np.stack([x.numpy() for x, _, _ in picked if x is not None])
    labels = np.array([y for x, y, _ in picked if x is not None])
    deploy = Run(run_dir).deploy_record()[0]
    if deploy.get("mean") and deploy.get("std"):
        mean, std = list(deploy["mean"]), list(deploy["std"])
    elif data.compute_stats:
        mean, std = split_statistics(train_split, build_transforms(data, train=False), data.skip_unreadable)
    else:
        mean, std = normalization({"mean": data.mean, "std": data.std}, data.dataset)
    return SimpleNamespace(images=images, labels=labels, classes=list(train_split.classes)), mean, std


def draw_attention(
    run_dir: str | Path,
    out: str | Path | None = None,
    num_images: int = 6,
    first_image: int = 0,
    which: str = "last",
    similarity_images: int = 500,
    overrides: list[str] = (),
) -> AttentionResult:
    """Write the attention figure (and, with 2+ networks, the similarity figure and CSV) of a run."""
    run_dir = Path(run_dir)
    method, cfg, _ = load_run_method(run_dir, which, overrides)
    labels = method.head_networks()  # a cohort of different networks: each network's name beside its head
    networks = {head_label(n, labels, " "): net for n, net in tap_networks(method).items()}
    require_tapped(networks, run_dir)
    networks = {n: net for n, net in networks.items() if _has_taps(net)}
    data = cfg.run.data
    if data.dataset in SPECS:
        split = load_cifar(data.root, data.dataset, train=False, download=data.download)
        mean, std = normalization({"mean": data.mean, "std": data.std}, data.dataset)
    else:
        split, mean, std = _folder_test_images(data, run_dir, max(first_image + num_images, similarity_images))
    names = list(networks)
    total = len(split.labels) if data.limit_test is None else min(len(split.labels), data.limit_test)
    num_images = max(1, min(num_images, total - first_image))
    picked = split.images[first_image : first_image + num_images]
    labels = split.labels[first_image : first_image + num_images]
    maps, logits = attention_maps(networks, _normalize(picked, mean, std))
    classes = getattr(split, "classes", None) or class_names(
        data.dataset, data.root, int(next(iter(logits.values())).shape[1])
    )

    plt = pyplot()
    ncols = len(names) + 1
    width = max(4.8, 1.9 * ncols)
    fig, axes = plt.subplots(num_images, ncols, figsize=(width, 2.3 * num_images + 0.7), squeeze=False)
    shown = {n: _display(maps[n], picked.shape[-2:]) for n in names}
    for r in range(num_images):
        img = picked[r].transpose(1, 2, 0)
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(f"#{first_image + r}: {classes[labels[r]]}", fontsize=8)
        gray = img.mean(axis=2) / 255.0
        for c, name in enumerate(names, start=1):
            pred = int(logits[name][r].argmax())
            ok = pred == int(labels[r])
            axes[r, c].imshow(gray, cmap="gray", vmin=0, vmax=1)
            axes[r, c].imshow(shown[name][r], cmap="jet", alpha=0.55, vmin=0, vmax=1)
            axes[r, c].set_title(f"{name}: {classes[pred]}", fontsize=8, color="green" if ok else "red")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    h, w = maps[names[0]].shape[-2:]
    fig.suptitle(
        f"{run_dir.name}: attention of the deepest tap ({h}x{w}, upsampled)\n"
        "titles: prediction (green right, red wrong)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out = Path(out) if out else run_dir / "attention.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)

    # similarity over more images, in batches
    n_sim = max(1, min(similarity_images, total))
    sims = {n: [] for n in names}
    for start in range(0, n_sim, 250):
        batch = _normalize(split.images[start : min(start + 250, n_sim)], mean, std)
        m, _ = attention_maps(networks, batch)
        for n in names:
            sims[n].append(m[n])
    cos, cen = similarity({n: torch.cat(v) for n, v in sims.items()})
    result = AttentionResult(out, None, None, names, cos, cen, n_sim)
    if len(names) >= 2:
        result.similarity_figure = out.with_name(f"{out.stem}_similarity.png")
        result.similarity_csv = out.with_name(f"{out.stem}_similarity.csv")
        _draw_similarity(plt, result, run_dir.name)
        with open(result.similarity_csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["network_a", "network_b", "cosine", "centered", "images"])
            for i, j in itertools.combinations(range(len(names)), 2):
                writer.writerow([names[i], names[j], f"{cos[i, j]:.6f}", f"{cen[i, j]:.6f}", n_sim])
    return result


def _draw_similarity(plt, result: AttentionResult, title: str) -> None:
    n = len(result.names)
    fig, axes = plt.subplots(1, 2, figsize=(2 * (1.6 + 1.0 * n), 1.4 + 1.0 * n), squeeze=False)
    for ax, (label, mat) in zip(
        axes[0], (("cosine", result.cosine), ("centered cosine", result.centered)), strict=True
    ):
        im = ax.imshow(mat, cmap="viridis", vmin=min(0.0, float(mat.min())), vmax=1.0)
        ax.set_xticks(range(n), result.names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), result.names, fontsize=8)
        for i, j in itertools.product(range(n), range(n)):
            ax.text(
                j, i, f"{mat[i, j]:.3f}", ha="center", va="center", fontsize=8, color="w" if mat[i, j] < 0.6 else "k"
            )
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{title}: attention-map similarity ({result.num_images} test images)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(result.similarity_figure, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- networks
def _has_taps(module: nn.Module) -> bool:
    return callable(getattr(module, "forward_taps", None))


def _singular(name: str) -> str:
    return name[:-1] if name.endswith("s") and len(name) > 1 else name


def tap_networks(method: nn.Module) -> dict[str, nn.Module]:
    """The networks of a method that expose ``forward_taps``, named like its heads.

    A method may define ``attention_networks() -> dict``; otherwise its children are searched: a network
    attribute keeps its name (``leader``, ``net``), a list of networks is numbered (``students`` ->
    ``student0``, ``student1``), a multi-branch network gives each branch (``branch0``, ...). Falls back to
    ``deployable()``.
    """
    custom = getattr(method, "attention_networks", None)
    if callable(custom):
        return dict(custom())
    found: dict[str, nn.Module] = {}

    def add(name: str, prefix: str, net: nn.Module) -> None:
        found[name if name not in found else f"{prefix.replace('.', '_')}{name}"] = net  # PCL: ema_branch0

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if _has_taps(child):
                add(name, prefix, child)
            elif callable(getattr(child, "single_branch", None)) and hasattr(child, "num_branches"):
                head = getattr(method, "head_prefix", "branch")
                for i in range(int(child.num_branches)):
                    add(f"{head}{i}", prefix, child.single_branch(i))
            elif isinstance(child, nn.ModuleList) and any(_has_taps(c) for c in child):
                for i, c in enumerate(child):  # a cohort of different networks: those that have taps
                    if _has_taps(c):
                        add(f"{_singular(name)}{i}", prefix, c)
            else:
                visit(child, f"{prefix}{name}.")

    visit(method, "")
    if not found:
        found["deployed"] = method.deployable()
    return found


def require_tapped(networks: dict[str, nn.Module], run_dir: Path) -> None:
    """Attention maps read the deepest feature tap: refuse, saying how to tap, when no network has taps."""
    if any(_has_taps(net) for net in networks.values()):
        return
    net = next(iter(networks.values()))
    inner = getattr(net, "net", net)
    children = [n for n, _ in inner.named_children()][:12]
    raise ConfigError(
        f"the network of {run_dir} has no feature taps (it was trained without model.taps), so there is no "
        "feature map to draw attention from. Name the submodules to tap, shallow to deep, on the command line: "
        f"okd attention {run_dir} 'model.taps=[layer1,layer2,layer3]' with your network's stage names (the deepest "
        f"tap is drawn; its top-level submodules are {children})"
    )
