"""The CMFF network (``docs/methods.md#cmff``; the method is :mod:`okd.methods.cmff`): two registered backbones run
stage by stage (a shared stem and, optionally, a shared classifier), the cross-stage knowledge projections into
``aux_stage``, the two self-supervised auxiliary heads (rotation classifier, similarity projection) and the
cross-attention between the nets' final features. The fusion module is not part of it: it has its own
optimizer group. State-dict keys: ``nets.{0,1}.*``, ``projections.{0,1}.{s}to{a}.*``, ``rot_head.*``,
``proj_head.*``, ``cross_attention.*``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okd.errors import ConfigError
from okd.models._init import bn_one_zero_
from okd.models.cmff_backbone import (
    HEAD_MODULES,
    STEM_MODULES,
    SUPPORTED,
    backbone_kind,
    classify,
    final_feature,
    run_stem,
    stage_list,
)
from okd.models.factory import create_model
from okd.models.registry import MODELS
from okd.nn.cross_attention import CrossAttentionFusion

if TYPE_CHECKING:
    from okd.methods.cmff import CMFFParams


def _projection(cin: int, cout: int, factor: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, factor, stride=factor, padding=0, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


def _mlp(widths: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class CMFFNet(nn.Module):
    """The two nets, the cross-stage projections, the auxiliary heads and the cross-attention (not the fusion
    module, which has its own optimizer group)."""

    def __init__(self, model: str, num_classes: int, hp: CMFFParams) -> None:
        super().__init__()
        if hasattr(model, "spec") or model not in MODELS:
            raise ConfigError(
                f"cmff supports {SUPPORTED}, not model.name={str(model)!r}: it runs two nets stage by stage with "
                "a shared stem and cross-stage projections built for those families' stage layout; your own or "
                "timm networks train with ffsd, dml, kd, kdcl and (with model.branch_from) the branch methods"
            )
        family = MODELS.info(model).get("family")
        if model == "vgg16":
            raise ConfigError(
                "cmff's CrossVGG16 is model.name=cmff_vgg16 (a shared 2-conv stem and 4 stages of 3 convs per net, "
                "docs/methods.md#cmff), not the OKDDip/PCL vgg16"
            )
        if family not in ("cmff_vgg", "resnet_cifar", "resnet_imagenet"):
            raise ConfigError(f"cmff supports {SUPPORTED}; got model.name={model!r}")
        kwargs = {"dropout": hp.dropout} if family == "cmff_vgg" else {}
        self.model, self.model_kwargs, self.num_classes = model, kwargs, num_classes
        self.nets = nn.ModuleList(create_model(model, num_classes, **kwargs) for _ in range(2))
        self.kind = kind = backbone_kind(self.nets[0])
        self.share_stem = hp.share_stem
        self.shared_classifier = kind == "vgg" if hp.shared_classifier is None else hp.shared_classifier
        for name in (STEM_MODULES[kind] if self.share_stem else ()) + (
            HEAD_MODULES[kind] if self.shared_classifier else ()
        ):
            setattr(self.nets[1], name, None)  # net 2 uses net 1's
        self.feature_dim = self.nets[0].feature_dim
        self.image_size = hp.image_size or (64 if kind == "resnet_imagenet" else 32)
        shapes = self._stage_shapes(self.image_size)
        self.num_stages = len(shapes)
        self.self_supervision = hp.self_supervision
        self.aux_stage = hp.aux_stage
        self.aux_pool = hp.aux_pool
        if hp.self_supervision:
            a = hp.aux_stage
            if a >= self.num_stages:
                raise ConfigError(f"method.aux_stage={a} but {model} has stages 0..{self.num_stages - 1}")
            self.projections = nn.ModuleList()
            for _ in range(2):
                per_net = nn.ModuleDict()
                for s in range(a):
                    (cs, hs, ws), (ct, ht, wt) = shapes[s], shapes[a]
                    if hs % ht or ws % wt or hs // ht != ws // wt:
                        raise ConfigError(f"stage {s} ({hs}x{ws}) does not downscale evenly to stage {a} ({ht}x{wt})")
                    per_net[f"{s}to{a}"] = _projection(cs, ct, hs // ht)
                self.projections.append(per_net)
            c, h, w = shapes[a]
            self.aux_in = c * (hp.aux_pool**2 if hp.aux_pool else h * w)
            hidden = list(hp.rot_hidden) if hp.rot_hidden is not None else [self.aux_in // 2, self.aux_in // 4]
            self.rot_head = _mlp([self.aux_in, *hidden, 4 * num_classes], hp.dropout)
            p = hp.proj_dim or self.aux_in
            self.proj_head = _mlp([self.aux_in, p, p], 0.0)
        self.cross_attention = CrossAttentionFusion(
            self.feature_dim,
            hp.attn_heads,
            layout=hp.attn_layout,
            query_from=hp.attn_query_from,
            mlp_ratio=hp.attn_mlp_ratio,
            attn_dropout=hp.attn_dropout,
            resid_dropout=hp.attn_dropout,
            linear_std=hp.linear_init_std,
        )
        for name in ("projections", "rot_head", "proj_head"):
            if hasattr(self, name):
                init_extras(getattr(self, name), hp.linear_init_std)

    @torch.no_grad()
    def _stage_shapes(self, size: int) -> list[tuple[int, int, int]]:
        net, was_training = self.nets[0], self.nets[0].training
        net.eval()
        h = run_stem(net, self.kind, torch.zeros(1, 3, size, size))
        shapes = []
        for stage in stage_list(net, self.kind):
            h = stage(h)
            shapes.append(tuple(h.shape[1:]))
        net.train(was_training)
        return shapes

    def stem_owner(self, i: int) -> nn.Module:
        return self.nets[0] if self.share_stem else self.nets[i]

    def head_owner(self, i: int) -> nn.Module:
        return self.nets[0] if self.shared_classifier else self.nets[i]

    def _aux_input(self, kappa: Tensor) -> Tensor:
        if self.aux_pool:
            kappa = F.adaptive_avg_pool2d(kappa, self.aux_pool)
        flat = kappa.flatten(1)
        if flat.shape[1] != self.aux_in:
            raise ValueError(
                f"the auxiliary heads were sized for {self.image_size}x{self.image_size} inputs ({self.aux_in} "
                f"features) but got {flat.shape[1]}; set method.image_size to the training resolution"
            )
        return flat

    def forward_nets(self, x: Tensor, aux: bool) -> tuple[list[Tensor], list[Tensor | None]]:
        """Both nets on x: (final maps, fused knowledge kappa^i at ``aux_stage`` or None)."""
        finals, fused = [], []
        shared = run_stem(self.nets[0], self.kind, x) if self.share_stem else None
        for i in range(2):
            h = shared if shared is not None else run_stem(self.stem_owner(i), self.kind, x)
            incoming: list[Tensor] = []
            kappa = None
            for s, stage in enumerate(stage_list(self.nets[i], self.kind)):
                h = stage(h)
                if aux and s < self.aux_stage:
                    incoming.append(self.projections[i][f"{s}to{self.aux_stage}"](h))
                elif aux and s == self.aux_stage:
                    kappa = h
                    for k in incoming:  # left to right, as the release
                        kappa = kappa + k
            finals.append(h)
            fused.append(kappa)
        return finals, fused

    def heads(self, finals: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        feats = [final_feature(f, self.kind) for f in finals]
        return [classify(self.head_owner(i), self.kind, f) for i, f in enumerate(feats)], feats

    def single_net(self, index: int) -> nn.Module:
        """Net ``index`` (0 or 1) as the plain registered backbone, shared stem / classifier included."""
        if index == 0:
            return self.nets[0]
        with torch.random.fork_rng(devices=[]):  # the trainer calls this every epoch: leave the RNG alone
            net = create_model(self.model, self.num_classes, **self.model_kwargs)
        state = dict(self.nets[1].state_dict())
        for name in (STEM_MODULES[self.kind] if self.share_stem else ()) + (
            HEAD_MODULES[self.kind] if self.shared_classifier else ()
        ):
            state.update({f"{name}.{k}": v for k, v in getattr(self.nets[0], name).state_dict().items()})
        net.load_state_dict(state)
        return net.to(next(self.parameters()).device)


def init_extras(module: nn.Module, linear_std: float) -> None:
    """Conv He fan_out (relu), BN 1/0, Linear N(0, linear_std) with bias 0 (the release's CrossVGG loop)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            bn_one_zero_(m)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
