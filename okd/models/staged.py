"""A user's (or timm) network as a sequence of named stages, for the branch methods (``model.branch_from``).

ONE, CL-ILR, OKDDip, FFL, PCL and individual branches share a trunk and replicate the rest of the network as
branches (:mod:`okd.models.multibranch`). For a network of one's own, ``model.branch_from: layer3`` names the
first replicated stage. The network qualifies when its forward is its top-level children called in order
(``nn.Sequential``, or a module whose ``forward`` does just that); this is verified on a probe batch, as is the
tail: after the last stage that outputs a feature map B x C x H x W come only parameter-free stages equal to
global average pooling + flatten (e.g. ``AdaptiveAvgPool2d(1), Flatten()``), then the classifier, which the
branch methods feed the pooled map (:class:`~okd.models.multibranch.MultiBranchNet`). Anything else is refused
with the reason.

:class:`StagedNet` registers the user's stages as its own children (state-dict keys are the user's:
``layer1.0.weight``) and runs them in order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okd.errors import ConfigError
from okd.models.branch_split import BranchSplit
from okd.models.external import _first_line, _probe


class StagedNet(nn.Module):
    """The stages of ``net`` (its top-level children, in order), split at ``branch_from``."""

    def __init__(self, net: nn.Module, num_classes: int, branch_from: str, *, name: str = "", input_size: int = 32):
        super().__init__()
        label = name or type(net).__name__
        stages = list(net.named_children())
        names = [n for n, _ in stages]
        self.num_classes = int(num_classes)
        if branch_from not in names:
            raise ConfigError(
                f"model.branch_from={branch_from!r} is not a top-level stage of {label}; its stages, in order: {names}"
            )
        if names.index(branch_from) == 0:
            raise ConfigError(f"model.branch_from={branch_from!r} is the first stage; the shared trunk would be empty")
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

    # ------------------------------------------------------------------------------------------ verification
    def _probe(self, net: nn.Module, label: str, size: int) -> tuple[list[Tensor], Tensor]:
        def run(x: Tensor):
            direct = net(x)
            outs = []
            for n in self.stage_names:
                x = getattr(self, n)(x)
                outs.append(x)
            return outs, direct

        try:
            return _probe(run, net, size)
        except Exception as exc:
            raise ConfigError(
                f"{label} fails on a 2 x 3 x {size} x {size} probe batch run stage by stage ({_first_line(exc)}); "
                "branch methods need a network whose forward calls its top-level children in order"
            ) from None

    def _verify(self, outputs: list[Tensor], direct, label: str, size: int) -> None:
        last = outputs[-1]
        if not isinstance(direct, Tensor) or tuple(direct.shape) != (2, self.num_classes):
            raise ConfigError(f"{label} must return logits of shape [2, {self.num_classes}] on a 2-image probe")
        if last.shape != direct.shape or not torch.allclose(last, direct, rtol=1e-4, atol=1e-5):
            raise ConfigError(
                f"{label}: calling its top-level children {list(self.stage_names)} in order does not give its own "
                "forward's output on a probe batch, so it cannot be cut into a shared trunk and branches "
                "(branch methods need an nn.Sequential-like network: no skip connection, functional op or reuse "
                "between its top-level children). Wrap the parts into stages whose sequence is the network"
            )

    def _cut(self, outputs: list[Tensor], branch_from: str, label: str) -> None:
        names = self.stage_names
        start = names.index(branch_from)
        maps = [i for i, t in enumerate(outputs) if t.ndim == 4]
        if not maps or maps[-1] < start or outputs[start - 1].ndim != 4:
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
        trunk_channels = int(outputs[start - 1].shape[1])
        self.trunk_shape = tuple(int(s) for s in outputs[start - 1].shape[1:])
        self.feature_dim = int(pooled.shape[1])
        self.split = BranchSplit(
            trunk=names[:start],
            branch=(*names[start : last_map + 1], names[-1]),
            head=names[-1],
            block=branch_from,
            trunk_channels=lambda _net, c=trunk_channels: c,
        )

    def forward(self, x: Tensor) -> Tensor:
        for n in self.stage_names:
            x = getattr(self, n)(x)
        return x
