"""Where a backbone is cut into a shared trunk and per-branch parts (branch methods: ONE, OKDDip, CL-ILR, ...)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BranchSplit:
    """Where a backbone family is cut: module names of the trunk and of each branch, in the order they run."""

    trunk: tuple[str, ...]  # run in this order on the input
    branch: tuple[str, ...]  # all but ``head`` run in this order on the trunk output; ``head`` runs last
    head: str  # the classifier module (input: the pooled, flattened final map)
    block: str  # the branch's main block (the one ``share_branch_block`` shares)
    trunk_channels: Callable[[nn.Module], int]
    #: ``(backbone, name) -> module`` the trunk / a branch takes for ``name`` (None: the backbone's attribute).
    #: A user's network cut inside a stage (``model.branch_from: blocks.4``) gives each side its half of it.
    trunk_part: Callable[[nn.Module, str], nn.Module] | None = None
    branch_part: Callable[[nn.Module, str], nn.Module] | None = None

    @property
    def branch_body(self) -> tuple[str, ...]:
        """The branch modules that produce its final map (every branch module but the classifier)."""
        return tuple(n for n in self.branch if n != self.head)
