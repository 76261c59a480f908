"""Baseline: one network trained with cross-entropy alone."""

from __future__ import annotations

from torch import Tensor, nn

from okd.methods.base import Method, MethodContext, ParamGroup, register_method, sgd_group
from okd.models import create_model
from okd.nn.losses import cross_entropy


@register_method("baseline", description="one network, cross-entropy only", paper="-")
class Baseline(Method):
    mixed_cohort = "it trains one network (the model section, or a model.members of one entry)"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.net = create_model(ctx.model, ctx.num_classes)

    def param_groups(self) -> list[ParamGroup]:
        return [sgd_group("net", self.net.parameters(), self.ctx.optim)]

    def training_step(self, images: Tensor, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        return {"net/ce": cross_entropy(self.net(images), labels)}

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        return {"net": self.net(images)}

    def deployable(self) -> nn.Module:
        return self.net
