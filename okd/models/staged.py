"""A user's (or timm) network as a sequence of named stages, for the branch methods (``model.branch_from``).

ONE, CL-ILR, OKDDip, FFL, PCL and individual branches share a trunk and replicate the rest of the network as
branches (:mod:`okd.models.multibranch`). For a network of one's own, ``model.branch_from: layer3`` names the
first replicated stage. The network qualifies when its forward is its top-level children called in order
(``nn.Sequential``, or a module whose ``forward`` does just that); this is verified on a probe batch, as is the
tail: after the last stage that outputs a feature map B x C x H x W come only parameter-free stages equal to
global average pooling + flatten (e.g. ``AdaptiveAvgPool2d(1), Flatten()``), then the classifier, which the
branch methods feed the pooled map (:class:`~okd.models.multibranch.MultiBranchNet`). Anything else is refused
with the reason: pooling done by a function in ``forward`` (the classifier would get a feature map), a dict or
tuple output. ``branch_from`` may also cut inside a top-level ``nn.Sequential`` stage (``blocks.4``: before its
child ``4``): the trunk and each branch then hold their half of that stage, under the same names, so the
deployed network keeps the user's state-dict keys; a cut deeper, or inside a module with a forward of its own,
is refused with the reason.

With ``model.taps`` too (``one_sl``: ONE's branches, and a leader that reads a tap), :class:`TappedStagedNet`
returns the outputs of those stages from ``forward_taps``.

:class:`StagedNet` registers the user's stages as its own children (state-dict keys are the user's:
``layer1.0.weight``) and runs them in order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okd.errors import ConfigError
from okd.models.branch_split import BranchSplit
from okd.models.external import _first_line, _probe


class StagedNet(nn.Module):
    """The stages of ``net`` (its top-level children, in order), split at ``branch_from``."""

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        branch_from: str,
        *,
        taps: Sequence[str] | None = None,
        name: str = "",
        input_size: int = 32,
    ):
        super().__init__()
        label = name or type(net).__name__
        stages = list(net.named_children())
        names = [n for n, _ in stages]
        self.num_classes = int(num_classes)
        self._check_taps(taps, names, label)
        self.cut = _inner_cut(net, branch_from, names, label)  # (stage, index) for a cut inside a stage
        if self.cut is not None and self.cut[1] == 0:
            branch_from, self.cut = self.cut[0], None  # before its first child: the stage boundary itself
        if self.cut is None:
            if branch_from not in names:
                raise ConfigError(
                    f"model.branch_from={branch_from!r} is not a top-level stage of {label}; its stages, in order: "
                    f"{names} (a cut inside an nn.Sequential stage is dotted: <stage>.<child>)"
                )
            if names.index(branch_from) == 0:
                raise ConfigError(
                    f"model.branch_from={branch_from!r} is the first stage; the shared trunk would be empty"
                )
        own = {id(p) for _, m in stages for p in (*m.parameters(), *m.buffers())}
        loose = [n for n, p in (*net.named_parameters(), *net.named_buffers()) if id(p) not in own]
        if loose:
            raise ConfigError(
                f"{label} holds tensors outside its stages ({loose[:3]}); branch methods need a network made "
                "only of its top-level child modules"
            )
        for n, m in stages:
            try:
                self.add_module(n, m)
            except KeyError:
                raise ConfigError(
                    f"{label}: stage name {n!r} is an nn.Module attribute; rename that submodule"
                ) from None
        self.stage_names = tuple(names)
        meta = any(p.device.type == "meta" for p in net.parameters())
        if meta:  # a shape-only copy (MultiBranchNet.single_branch): the real network was verified
            self.split, self.feature_dim, self.trunk_shape = None, 0, ()
            return
        outputs, direct = self._probe(net, label, input_size)
        self._verify(outputs, direct, label, input_size)
        self._cut(outputs, branch_from, label)
        self._tap_shapes(outputs)

    # -------------------------------------------------------------------------------------------------- taps
    def _check_taps(self, taps: Sequence[str] | None, names: list[str], label: str) -> None:
        """``model.taps`` beside ``model.branch_from`` (one_sl's leader reads a tap): top-level stages, once each."""
        self.tap_names = list(taps) if taps else None
        if taps is None:
            return
        if not taps:
            raise ConfigError("model.taps is empty; name the stages whose outputs are the feature taps")
        unknown = [t for t in taps if t not in names]
        if unknown or len(set(taps)) != len(taps):
            problem = f"{unknown} are not stages" if unknown else "a stage is named twice"
            raise ConfigError(
                f"model.taps={list(taps)}: {problem}. Beside model.branch_from, each tap is the output of a top-level "
                f"stage of {label}, named once; its stages, in order: {names}"
            )

    def _tap_shapes(self, outputs: list[Tensor]) -> None:
        if self.tap_names is None:
            return
        index = {n: i for i, n in enumerate(self.stage_names)}
        bad = [f"{t}: {list(outputs[index[t]].shape[1:])}" for t in self.tap_names if outputs[index[t]].ndim != 4]
        if bad:
            raise ConfigError(
                f"model.taps must name stages that output feature maps (B x C x H x W); these do not: {'; '.join(bad)}"
            )
        self.tap_shapes = [tuple(int(s) for s in outputs[index[t]].shape[1:]) for t in self.tap_names]
        self.tap_channels = tuple(s[0] for s in self.tap_shapes)

    # ------------------------------------------------------------------------------------------ verification
    def _probe(self, net: nn.Module, label: str, size: int) -> tuple[list[Tensor], Tensor]:
        failed: list[tuple[str, Tensor]] = []  # the stage that raised, and its input

        def stage(n: str, x: Tensor) -> Tensor:
            if self.cut is None or n != self.cut[0]:
                return getattr(self, n)(x)
            for j, child in enumerate(getattr(self, n)):  # an nn.Sequential: its children in order
                if j == self.cut[1]:
                    self._trunk_output = x
                x = child(x)
            return x

        def run(x: Tensor):
            direct = net(x)
            if not isinstance(direct, Tensor):
                return [], direct  # refused by _verify, saying what came back
            outs = []
            for n in self.stage_names:
                try:
                    y = stage(n, x)
                except Exception:
                    failed.append((n, x))
                    raise
                x = y
                outs.append(x)
            return outs, direct

        try:
            return _probe(run, net, size)
        except Exception as exc:
            if failed and failed[0][0] == self.stage_names[-1] and failed[0][1].ndim == 4:
                raise ConfigError(self._functional_pooling(label, failed[0][1], f" ({_first_line(exc)})")) from None
            where = f" in stage {failed[0][0]!r}" if failed else ""
            raise ConfigError(
                f"{label} fails on a 2 x 3 x {size} x {size} probe batch run stage by stage{where} "
                f"({_first_line(exc)}); branch methods need a network whose forward calls its top-level children "
                "in order"
            ) from None

    def _functional_pooling(self, label: str, fmap: Tensor, error: str = "") -> str:
        name = self.stage_names[-1]
        return (
            f"{label}: its last stage {name!r} (the classifier) gets the feature map {list(fmap.shape[1:])} when "
            f"its top-level children run in order{error}, so its forward pools between stages with a function "
            "(e.g. x.mean((2, 3)) or F.adaptive_avg_pool2d). Branch methods need the pooling as stages: add "
            f"nn.AdaptiveAvgPool2d(1) and nn.Flatten() as top-level children before {name!r} and call them in forward"
        )

    def _verify(self, outputs: list[Tensor], direct, label: str, size: int) -> None:
        if not isinstance(direct, Tensor):
            what = (
                f"a dict (keys {list(direct)[:6]})"
                if isinstance(direct, dict)
                else f"a {type(direct).__name__} of {len(direct)}"
                if isinstance(direct, list | tuple)
                else f"a {type(direct).__name__}"
            )
            raise ConfigError(
                f"{label} returned {what} on a 2-image probe, not a logits tensor; branch methods need a forward "
                f"that returns the logits alone (shape [2, {self.num_classes}]): return the classifier output, or "
                "wrap the network in a module that picks it"
            )
        last = outputs[-1]
        if last.ndim == 4 and len(outputs) >= 2 and outputs[-2].ndim == 4:
            raise ConfigError(self._functional_pooling(label, outputs[-2]))
        if tuple(direct.shape) != (2, self.num_classes):
            raise ConfigError(
                f"{label} returned a tensor of shape {list(direct.shape)} on a 2-image probe; it must return logits "
                f"of shape [2, {self.num_classes}]"
            )
        if last.shape != direct.shape or not torch.allclose(last, direct, rtol=1e-4, atol=1e-5):
            raise ConfigError(
                f"{label}: calling its top-level children {list(self.stage_names)} in order does not give its own "
                "forward's output on a probe batch, so it cannot be cut into a shared trunk and branches "
                "(branch methods need an nn.Sequential-like network: no skip connection, functional op or reuse "
                "between its top-level children). Wrap the parts into stages whose sequence is the network"
            )

    def _cut(self, outputs: list[Tensor], branch_from: str, label: str) -> None:
        names = self.stage_names
        if self.cut is None:  # the trunk: the stages before branch_from
            start, trunk_names, trunk_out = names.index(branch_from), names[: names.index(branch_from)], None
        else:  # the trunk ends inside the stage self.cut[0], which both the trunk and the branches hold part of
            start = names.index(self.cut[0])
            trunk_names, trunk_out = names[: start + 1], self.__dict__.pop("_trunk_output")
        trunk_out = outputs[start - 1] if trunk_out is None else trunk_out
        maps = [i for i, t in enumerate(outputs) if t.ndim == 4]
        if not maps or maps[-1] < start or trunk_out.ndim != 4:
            raise ConfigError(
                f"{label}: the trunk (stages before {branch_from!r}) and the branch must both output feature maps "
                f"B x C x H x W; the stages output {[list(t.shape[1:]) for t in outputs]}"
            )
        last_map = maps[-1]
        between = names[last_map + 1 : -1]
        head_input = outputs[-2]
        pooled = F.adaptive_avg_pool2d(outputs[last_map], 1).flatten(1)
        params = [n for n in between if any(True for _ in getattr(self, n).parameters())]
        if (
            last_map == len(names) - 1
            or params
            or head_input.shape != pooled.shape
            or not torch.allclose(head_input, pooled, rtol=1e-4, atol=1e-6)
        ):
            raise ConfigError(
                f"{label}: branch methods pool each branch's last feature map globally and feed the classifier; "
                f"the stages after {names[last_map]!r} ({list(names[last_map + 1 :])}) must be global average "
                "pooling + flatten without parameters, then the classifier as the last stage (e.g. "
                "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, num_classes))"
            )
        trunk_channels = int(trunk_out.shape[1])
        self.trunk_shape = tuple(int(s) for s in trunk_out.shape[1:])
        self.feature_dim = int(pooled.shape[1])
        cut = self.cut
        self.split = BranchSplit(
            trunk=trunk_names,
            branch=(*names[start : last_map + 1], names[-1]),
            head=names[-1],
            block=names[start],
            trunk_channels=lambda _net, c=trunk_channels: c,
            trunk_part=None if cut is None else lambda net, n: _part(net, n, cut, trunk=True),
            branch_part=None if cut is None else lambda net, n: _part(net, n, cut, trunk=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        for n in self.stage_names:
            x = getattr(self, n)(x)
        return x


class TappedStagedNet(StagedNet):
    """A :class:`StagedNet` with ``forward_taps``: the outputs of the stages ``model.taps`` names (one_sl: ONE's
    branches are cut at ``branch_from`` and the leader reads the deepest tap)."""

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The logits and the outputs of the ``model.taps`` stages (in that order), from one pass."""
        found: dict[str, Tensor] = {}
        for n in self.stage_names:
            x = getattr(self, n)(x)
            found[n] = x
        return x, [found[t] for t in self.tap_names]


def _plain_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward is its children in order (not overridden)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _inner_cut(net: nn.Module, branch_from: str, names: list[str], label: str) -> tuple[str, int] | None:
    """``(stage, child index)`` of a dotted ``branch_from`` (``blocks.4``: the cut before child ``4`` of the
    top-level ``nn.Sequential`` stage ``blocks``); None for a top-level name; the exact reason otherwise."""
    top, dot, inner = branch_from.partition(".")
    if not dot or top not in names:
        return None
    container = getattr(net, top)
    children = [n for n, _ in container.named_children()]
    why = None
    if not _plain_sequential(container):
        why = (
            f"{top!r} is a {type(container).__name__} whose forward is its own code, so where a cut inside it "
            "falls is not defined (only an nn.Sequential runs its children in order)"
        )
    elif inner not in children:
        deeper = inner.partition(".")[0] in children
        why = (
            f"a cut is made at most one level down, between the children of a top-level nn.Sequential stage; "
            f"{branch_from!r} goes deeper"
            if deeper
            else f"{top!r} has no child {inner!r}; its children: {children[:12]}"
        )
    if why is not None:
        raise ConfigError(
            f"model.branch_from={branch_from!r}: {why}. Cut {label} between top-level stages ({names}) or between "
            f"the children of a top-level nn.Sequential (<stage>.<child>), or split that part into two stages in "
            "your factory"
        )
    return top, children.index(inner)


def _part(net: nn.Module, name: str, cut: tuple[str, int], *, trunk: bool) -> nn.Module:
    """Stage ``name`` of ``net``, or for the stage cut inside, its trunk or branch half: an ``nn.Sequential`` of
    those children under their own names, so state-dict keys stay the network's (``blocks.4.weight``)."""
    module = getattr(net, name)
    if name != cut[0]:
        return module
    children = list(module.named_children())
    return nn.Sequential(OrderedDict(children[: cut[1]] if trunk else children[cut[1] :]))
