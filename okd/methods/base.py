"""The method contract: a method is an ``nn.Module`` that owns its cohort and knows how it is optimised.

The generic trainer calls, per step, ``training_step`` and backpropagates the sum of the returned losses
once; then it steps one optimizer per :class:`ParamGroup` (each with its own lr schedule).
Keys of the loss dict that start with ``stat/`` are logged but not summed. The whole contract, with the optional
hooks and the tests a method needs: docs/add-a-method.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from okd.config import OptimConfig
from okd.errors import ConfigError
from okd.registry import Registry


@dataclass
class ParamGroup:
    """One optimizer's worth of parameters with its own settings."""

    name: str
    params: list[nn.Parameter]
    optimizer: str = "sgd"  # "sgd" | "adam"
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    #: this group's lr schedule: None follows optim.schedule (SGD groups) or "multistep" (Adam groups);
    #: "constant" keeps the group's lr fixed (e.g. CMFF's fusion module)
    schedule: str | None = None


def sgd_group(name: str, params, optim: OptimConfig, weight_decay: float | None = None) -> ParamGroup:
    """An SGD group with the run's lr/momentum/nesterov and, unless given, its weight decay."""
    return ParamGroup(
        name=name,
        params=list(params),
        optimizer="sgd",
        lr=optim.lr,
        weight_decay=optim.weight_decay if weight_decay is None else weight_decay,
        momentum=optim.momentum,
        nesterov=optim.nesterov,
    )


def adam_group(name: str, params, lr: float = 1e-3, weight_decay: float = 1e-4) -> ParamGroup:
    """An Adam group (coupled L2 weight decay, as ``torch.optim.Adam``)."""
    return ParamGroup(name=name, params=list(params), optimizer="adam", lr=lr, weight_decay=weight_decay)


@dataclass
class NoParams:
    """A method without knobs."""


@dataclass
class MethodContext:
    """What a method needs to build itself."""

    model: str
    num_classes: int
    optim: OptimConfig
    params: Any
    epochs: int
    extra: dict = field(default_factory=dict)
    #: ``model.members`` resolved, one network per member in order (names or ModelRefs for ``create_model``);
    #: None: the cohort is copies of ``model``. Only methods whose ``mixed_cohort`` is None see different ones.
    members: list[str] | None = None

    @property
    def input_size(self) -> int:
        """The side of the training images (``extra['input_size']``; 32, CIFAR's, for a context built without it):
        the size a network given by import path is probed at."""
        return int(self.extra.get("input_size", 32))

    def cohort(self, size: int) -> list[str]:
        """The networks of a cohort of ``size``: the members, or ``size`` copies of ``model``."""
        if self.members is None:
            return [self.model] * size
        if len(self.members) != size:
            raise ConfigError(f"model.members lists {len(self.members)} networks, but the method builds {size}")
        return list(self.members)


class Method(nn.Module):
    """Base class of every method. Subclasses set ``Params`` (a dataclass of their knobs)."""

    Params: ClassVar[type] = NoParams
    #: how many independently augmented views of each training image a step receives
    views: ClassVar[int] = 1
    #: the eval head that scores ``deployable()`` (used to select best.pt); None: the first head
    deploy_head: ClassVar[str | None] = None
    #: None: the method trains a cohort of different networks (``model.members``, read from ``ctx.members``);
    #: a reason: why it cannot, which ``build_config`` gives before training when the members differ
    mixed_cohort: ClassVar[str | None] = (
        "it builds every network of its cohort from the model section (model.name), so all are copies of one network"
    )
    #: the ``Params`` field that counts the networks built from the model section (DML: num_nets), filled from
    #: ``model.members`` when the config leaves it out; None: :meth:`cohort_size` says
    cohort_key: ClassVar[str | None] = None
    #: a ``Params`` field that lists the cohort in the method's own older spelling (KDCL: ``models``)
    members_key: ClassVar[str | None] = None
    #: True when ``manual_step`` keeps the processes of a DistributedDataParallel run in step itself: its backward
    #: goes through ``runner.model`` and every other gradient through ``runner.average_across_processes``
    ddp_manual_step: ClassVar[bool] = False
    #: a ``manual_optimization`` method that runs under DDP with one wrapper per network (``distribute_networks``)
    ddp_per_network: ClassVar[bool] = False

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.hp = ctx.params

    def forward(
        self, images: Tensor | list[Tensor], labels: Tensor, epoch: int, scalars: dict[str, float] | None = None
    ) -> dict[str, Tensor]:
        """``training_step`` (so that a DistributedDataParallel wrapper sees the whole cohort's forward); with
        ``scalars`` (``epoch_scalars(epoch)``, computed by the caller) the step reads those instead."""
        if scalars is None:
            return self.training_step(images, labels, epoch)
        return self.training_step(images, labels, epoch, scalars=scalars)

    def param_groups(self) -> list[ParamGroup]:
        raise NotImplementedError

    def training_step(self, images: Tensor | list[Tensor], labels: Tensor, epoch: int) -> dict[str, Tensor]:
        """One forward of the cohort; ``epoch`` is the 0-based epoch index. Returns named scalar losses."""
        raise NotImplementedError

    def epoch_scalars(self, epoch: int) -> dict[str, float]:
        """The Python floats of a step that depend on the epoch (loss-weight ramps), by name.

        A method that has some overrides this and gives ``training_step`` a keyword ``scalars`` that, when given,
        replaces ``epoch_scalars(epoch)``: a compiled step computes them outside its graph and passes them in, so
        that a new epoch is a new input rather than a recompilation."""
        return {}

    def scalars_at(self, epoch: int, scalars: dict[str, float] | None) -> dict[str, float]:
        """``scalars`` when the caller computed them, else ``epoch_scalars(epoch)``."""
        return self.epoch_scalars(epoch) if scalars is None else scalars

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """Logits (or log-probabilities) of every head worth reporting."""
        raise NotImplementedError

    def deployable(self) -> nn.Module:
        """The single network a user keeps."""
        raise NotImplementedError

    def oracle_groups(self) -> dict[str, list[str]]:
        """Metrics named ``<key>`` reporting "any of these heads is correct" (an oracle, not an ensemble)."""
        return {}

    @property
    def manual_optimization(self) -> bool:
        """True when the method interleaves forwards and optimizer steps itself (see ``manual_step``)."""
        return False

    def manual_step(self, images: Tensor | list[Tensor], labels: Tensor, epoch: int, runner) -> dict[str, Tensor]:
        """One step for methods whose reference algorithm steps some optimizers before later forwards (DML's
        alternating updates). Use ``runner.zero_grad(i)``, ``runner.backward(loss)`` and ``runner.step_optimizer(i)``
        (optimizer ``i`` = the i-th ParamGroup); return detached losses for logging."""
        raise NotImplementedError

    def ddp_ignored_parameters(self) -> list[str]:
        """Names of parameters DistributedDataParallel leaves alone (no gradient in the wrapped forward; the method
        averages theirs itself)."""
        return []

    def distribute_networks(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """DistributedDataParallel for a ``manual_optimization`` method that sets ``ddp_per_network``: wrap each
        network that trains in its own wrapper (``wrap`` builds one), forward through the wrappers, and reduce over
        all ranks any batch statistic that decides which optimizers step, so that every rank takes the same
        branch. Without ``ddp_per_network`` the runner refuses DDP for such a method."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step (e.g. to update an EMA copy)."""

    def after_evaluation(self, epoch: int) -> None:
        """Called at the end of every epoch (0-based ``epoch``), after its evaluation when the epoch is scored
        (``train.eval_every``) and before the checkpoint is written (OKDPH's epoch-level fusion); what it changes
        is saved with the epoch."""

    def fit_on_holdout(self, batches) -> None:
        """Called before every training epoch with un-augmented held-out training batches when
        ``data.holdout > 0`` (e.g. KDCL's "general" ensembling weights)."""

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Extra metrics computed from an evaluation's ``{'<head>/top1': ...}`` (e.g. a best-of-heads figure)."""
        return {}

    @classmethod
    def views_for(cls, params) -> int:
        """Augmented views per training image for these parameters (default: the class's ``views``)."""
        return cls.views

    @classmethod
    def view_augmentations(cls, params) -> list[str] | None:
        """The named augmentation of each view (``okd.data.views``), or None: every view gets the standard crop."""
        return None

    @classmethod
    def cohort_size(cls, params) -> int:
        """How many networks the method builds from the model section (``model.members`` lists that many): the
        ``cohort_key`` field, else one."""
        return int(getattr(params, cls.cohort_key)) if cls.cohort_key else 1

    @property
    def deployed_member(self) -> int | None:
        """The index in ``ctx.members`` of the network ``deployable()`` returns; None: a copy of ``ctx.model``
        (every method whose ``mixed_cohort`` is None says which member it deploys)."""
        return None

    def head_networks(self) -> dict[str, str]:
        """The network of each per-network head when the cohort mixes networks (``{"net1": "wrn16_2"}``): the log,
        ``okd test`` and ``okd report`` show it beside the head. ``{}`` for copies of one network."""
        return {}


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str, description: str, paper: str):
    """Register a finished method class under ``name``."""
    return METHODS.register(name, description=description, paper=paper)
