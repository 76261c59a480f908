"""Individual branches: the ONE/CL multi-branch network trained with the sum of the branches' CEs only.

The OKDDip repo's ``train_one.py --ind`` baseline (``docs/methods.md#individual``): no distillation, no gradient
rescaling.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from okd.methods.base import register_method
from okd.methods.branch_base import BranchMethod, BranchParams
from okd.nn.losses import cross_entropy


@dataclass
class IndividualParams(BranchParams):
    num_branches: int = 4


@register_method(
    "individual",
    description="multi-branch net (shared trunk) trained with the sum of branch CEs only (ONE/CL baseline)",
    paper="-",
)
class Individual(BranchMethod):
    Params = IndividualParams

    def training_step(self, images: Tensor, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        logits = self.net(images)
        return {f"branch{i}/ce": cross_entropy(z, labels) for i, z in enumerate(logits)}
