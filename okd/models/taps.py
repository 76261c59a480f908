"""What methods that read feature taps require of a network, checked before training with a clear error.

Registered backbones expose their taps (``forward_taps``, ``tap_channels``) and satisfy every method's needs by
construction. A user's or timm network gets taps from ``model.taps`` (:class:`~okd.models.external.TappedNet`,
which records the probed ``tap_shapes``, C x H x W, shallow to deep); these checks read those shapes.
"""

from __future__ import annotations

from torch import nn

from okd.errors import ConfigError


def _shapes(net: nn.Module) -> list[tuple[int, int, int]] | None:
    return getattr(net, "tap_shapes", None)


def require_taps(net: nn.Module, method: str, min_taps: int = 1) -> None:
    """``net`` must expose ``forward_taps`` with at least ``min_taps`` taps."""
    if not callable(getattr(net, "forward_taps", None)):
        inner = getattr(net, "net", net)
        children = [n for n, _ in inner.named_children()][:12]
        raise ConfigError(
            f"{method} reads intermediate feature maps, and this network has no taps: set model.taps to the "
            f"submodules whose outputs they are, shallow to deep (e.g. model.taps=[layer1,layer2,layer3]); "
            f"its top-level submodules are {children}"
            + (
                " (beside model.branch_from they are stages; for one_sl end them at the stage whose map the "
                "branches pool)"
                if getattr(net, "stage_names", None)
                else ""
            )
        )
    count = len(getattr(net, "tap_channels", ()))
    if count < min_taps:
        raise ConfigError(f"{method} needs at least {min_taps} feature taps; model.taps names {count}")


def check_halving_taps(net: nn.Module, method: str, why: str) -> None:
    """Successive taps must halve the spatial size (H and W), keeping their order shallow -> deep.

    ``why`` says which part of the method needs it. Names the taps that qualify when the layout does not.
    """
    shapes = _shapes(net)
    if shapes is None:
        return
    names = list(getattr(net, "tap_names", [str(i) for i in range(len(shapes))]))
    bad = [
        f"{names[j]} {list(shapes[j][1:])} -> {names[j + 1]} {list(shapes[j + 1][1:])}"
        for j in range(len(shapes) - 1)
        if (shapes[j][1], shapes[j][2]) != (2 * shapes[j + 1][1], 2 * shapes[j + 1][2])
    ]
    if not bad:
        return
    deepest = shapes[-1]
    chain = [names[-1]]
    for j in range(len(shapes) - 2, -1, -1):
        want = (deepest[1] * 2 ** (len(chain)), deepest[2] * 2 ** (len(chain)))
        if (shapes[j][1], shapes[j][2]) == want:
            chain.insert(0, names[j])
    shown = ", ".join(f"{n} {list(s)}" for n, s in zip(names, shapes, strict=True))
    hint = (
        f"of these taps, {chain} form such a chain ending at the deepest tap"
        if len(chain) >= 2
        else "no shallower tap is twice the deepest one's size"
    )
    raise ConfigError(
        f"{method}: {why}, so each tap must be twice the height and width of the next (deeper) one; "
        f"model.taps (C x H x W on the probe) are {shown}, and {'; '.join(bad)} does not halve. Choose taps "
        f"at successive stride-2 stages ({hint}), or set method.self_distillation=none"
    )
