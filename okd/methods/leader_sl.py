"""FFSD's leader-student strategy added to DML or ONE: "DML+SL" and "ONE+SL" (FFSD paper, Table V).

No code exists for these variants (``docs/methods.md#dml_sl-one_sl``); this is the likeliest reading, built
from FFSD's own pieces with FFSD's settings. **Interpreted:**

- The peers (DML's networks, or ONE's branches with its gate) train exactly as in plain DML / ONE.
- A fusion module F (``okd.nn.fusion.FusionModule``) takes the peers' final maps, **detached**, concatenated:
  U = cat(A_1, ..., A_M). L_F = CE(z_F, y) + KL_T(z_ens -> z_F), z_ens the detached mean of peer logits.
- An independent leader network (same backbone) with FFSD's TransFusion decoder d_L on its deepest map A_L:
  L_L = CE(z_L, y) + KL_T(z_F -> z_L) + lambda(e) NL2(att(A_L), att(Phi)) + lambda(e) NL2(att(d_L), att(U)),
  targets detached, Phi the fused map; ``leader_decoder=false`` drops the decoder term.
- FFSD's constants: T = 2 for the two KLs above, lambda = 10 with FFSD's warm-up over the first 5 (1-based)
  epochs, fusion weight decay 1e-5. No diversity and no self-distillation terms (those are FFSD's own
  contributions, not the leader strategy).

Nothing reaches the peers from the fusion module or the leader, so their training is unchanged. Heads: the
peers' heads as in DML/ONE, ``fusion`` and ``leader``; ``deploy.pt`` holds the leader (decoder dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from okd.errors import ConfigError
from okd.methods.base import MethodContext, ParamGroup, register_method, sgd_group
from okd.methods.branch_base import scalar
from okd.methods.dml import DML, DMLParams, dml_losses
from okd.methods.one import ONE, ONEParams, gated_logits, one_losses
from okd.models import create_model
from okd.models.taps import require_taps
from okd.nn.fusion import FusionModule, TransFusionDecoder
from okd.nn.losses import attention_map, cross_entropy, ffsd_warmup, kl_div_t, logit_mean, normalized_l2


@dataclass
class SLParams:
    """The leader-strategy knobs (FFSD's values)."""

    sl_temperature: float = 2.0
    #: lambda_fusion on the leader's two feature terms
    fusion_weight: float = 10.0
    #: FFSD's loss-weight warm-up length (1-based epochs); 0 disables it
    warmup_epochs: int = 5
    leader_decoder: bool = True
    fusion_weight_decay: float = 1e-5

    def validate_sl(self) -> None:
        if self.sl_temperature <= 0:
            raise ConfigError(f"method.sl_temperature must be positive, got {self.sl_temperature}")
        for key in ("fusion_weight", "warmup_epochs", "fusion_weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key} must be >= 0, got {getattr(self, key)}")


def fusion_weight(hp: SLParams, epoch: int) -> float:
    """The fused-map weight of ``epoch`` (0-based): ``fusion_weight`` times FFSD's warm-up."""
    return hp.fusion_weight * ffsd_warmup(epoch + 1, hp.warmup_epochs)


class LeaderStrategy(nn.Module):
    """The leader network (+ TransFusion decoder) and the fusion module over ``num_peers`` detached peer maps."""

    def __init__(self, model: str, num_classes: int, channels: int, num_peers: int, decoder: bool) -> None:
        super().__init__()
        self.leader = create_model(model, num_classes)
        require_taps(self.leader, "the leader strategy (method.leader)")
        if self.leader.tap_channels[-1] != channels:
            raise ConfigError(
                f"{model}: the leader's last map has {self.leader.tap_channels[-1]} channels, the peers' {channels}"
            )
        self.decoder = TransFusionDecoder(channels, num_peers) if decoder else None
        self.fusion = FusionModule(channels, num_classes, num_peers)

    def leader_params(self) -> list[nn.Parameter]:
        params = list(self.leader.parameters())
        return params + (list(self.decoder.parameters()) if self.decoder is not None else [])

    def fuse(self, peer_maps: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """U (detached peer maps), fusion logits z_F and fused map Phi."""
        u = torch.cat([m.detach() for m in peer_maps], dim=1)
        z_f, phi = self.fusion(u)
        return u, z_f, phi

    def losses(
        self, images: Tensor, peer_maps: list[Tensor], peer_logits: list[Tensor], labels: Tensor, epoch: int,
        hp: SLParams, lam: float | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        u, z_f, phi = self.fuse(peer_maps)
        z_l, taps = self.leader.forward_taps(images)
        a_l = taps[-1]
        T = hp.sl_temperature
        if lam is None:  # the fused-map weight of ``epoch`` (given when the caller computed it)
            lam = fusion_weight(hp, epoch)
        losses = {
            "fusion/ce": cross_entropy(z_f, labels),
            "fusion/kl": kl_div_t(z_f, logit_mean(peer_logits), T, detach_target=True),
            "leader/ce": cross_entropy(z_l, labels),
            "leader/kl": kl_div_t(z_l, z_f, T, detach_target=True),
            "leader/fused_map": lam * normalized_l2(attention_map(a_l), attention_map(phi).detach()),
        }
        if self.decoder is not None:
            losses["leader/decoder"] = lam * normalized_l2(attention_map(self.decoder(a_l)), attention_map(u))
        losses["stat/fusion_weight"] = scalar(lam, z_l)
        return losses

    def heads(self, images: Tensor, peer_maps: list[Tensor]) -> dict[str, Tensor]:
        return {"fusion": self.fuse(peer_maps)[1], "leader": self.leader(images)}

    def param_groups(self, optim, hp: SLParams) -> list[ParamGroup]:
        return [
            sgd_group("leader", self.leader_params(), optim),
            sgd_group("fusion", self.fusion.parameters(), optim, weight_decay=hp.fusion_weight_decay),
        ]


@dataclass
class DMLSLParams(SLParams, DMLParams):
    def validate(self) -> None:
        DMLParams.validate(self)
        self.validate_sl()


@dataclass
class ONESLParams(SLParams, ONEParams):
    def validate(self) -> None:
        ONEParams.validate(self)
        self.validate_sl()


@register_method(
    "dml_sl",
    description="DML + FFSD's leader strategy: a leader learns through a fusion module over the DML nets' maps",
    paper="Li et al. Distilling a Powerful Student Model via Online Knowledge Distillation. arXiv 2103.14473 (Table V)",
)
class DMLSL(DML):
    Params = DMLSLParams
    mixed_cohort = (
        "its fusion module concatenates the nets' last feature maps channel by channel (maps of equal shapes), "
        "and its leader is one more copy of the nets' network"
    )

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.deploy_head = "leader"
        channels = self.nets[0].tap_channels[-1]
        self.sl = LeaderStrategy(ctx.model, ctx.num_classes, channels, len(self.nets), self.hp.leader_decoder)

    def param_groups(self) -> list[ParamGroup]:
        return super().param_groups() + self.sl.param_groups(self.ctx.optim, self.hp)

    def _peers(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        outs = [net.forward_taps(images) for net in self.nets]
        return [z for z, _ in outs], [taps[-1] for _, taps in outs]

    def epoch_scalars(self, epoch: int) -> dict[str, float]:
        return {"fusion_weight": fusion_weight(self.hp, epoch)}

    def training_step(
        self, images: Tensor, labels: Tensor, epoch: int, scalars: dict[str, float] | None = None
    ) -> dict[str, Tensor]:
        s = self.scalars_at(epoch, scalars)
        logits, maps = self._peers(images)
        losses = dml_losses(logits, labels, self.hp)
        losses.update(self.sl.losses(images, maps, logits, labels, epoch, self.hp, lam=s["fusion_weight"]))
        return losses

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        logits, maps = self._peers(images)
        return {**self.net_heads(logits), **self.sl.heads(images, maps)}

    def deployable(self) -> nn.Module:
        return self.sl.leader


@register_method(
    "one_sl",
    description="ONE + FFSD's leader strategy: a leader learns through a fusion module over the ONE branches' maps",
    paper="Li et al. Distilling a Powerful Student Model via Online Knowledge Distillation. arXiv 2103.14473 (Table V)",
)
class ONESL(ONE):
    Params = ONESLParams

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.deploy_head = "leader"
        self.sl = LeaderStrategy(
            ctx.model, ctx.num_classes, self.net.feature_dim, self.net.num_branches, self.hp.leader_decoder
        )

    def param_groups(self) -> list[ParamGroup]:
        peers = sgd_group("net", [*self.net.parameters(), *self.gate.parameters()], self.ctx.optim)
        return [peers, *self.sl.param_groups(self.ctx.optim, self.hp)]

    def epoch_scalars(self, epoch: int) -> dict[str, float]:
        return {**super().epoch_scalars(epoch), "fusion_weight": fusion_weight(self.hp, epoch)}

    def training_step(
        self, images: Tensor, labels: Tensor, epoch: int, scalars: dict[str, float] | None = None
    ) -> dict[str, Tensor]:
        s = self.scalars_at(epoch, scalars)
        out, gate = self.forward_one(images)
        losses = one_losses(out, gate, labels, self.hp, epoch, w=s["kl_weight"])
        losses.update(self.sl.losses(images, out.maps, out.logits, labels, epoch, self.hp, lam=s["fusion_weight"]))
        return losses

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        out, gate = self.forward_one(images)
        heads = self.branch_heads(out.logits)
        heads["gated"] = gated_logits(out.logits, gate)
        heads.update(self.sl.heads(images, out.maps))
        return heads

    def deployable(self) -> nn.Module:
        return self.sl.leader
