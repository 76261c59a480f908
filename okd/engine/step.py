"""One optimisation step of a cohort, with the precision/layout/compile switches of ``train``.

``train.compile=true`` compiles the whole loss computation of a step: the cohort's forwards and every loss term,
i.e. the function ``(images, labels, epoch, scalars) -> (losses, total)`` of :func:`loss_function`, with autocast
inside it; its backward is compiled with it (AOTAutograd). The epoch-dependent loss weights enter as inputs
(``Method.epoch_scalars``), so a new epoch does not recompile. The optimizer steps stay outside the graph: they are
fused kernels already (``okd.engine.builder.build_optimizer``). Methods that step optimizers inside the step
(``manual_optimization``: DML's alternating updates) compile the forwards of their networks instead; under DDP
such a method wraps each network separately (``Method.ddp_per_network``), or DDP refuses it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed
from torch import Tensor

from okd.config import TrainConfig
from okd.errors import ConfigError
from okd.methods.base import Method

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def configure_backends(cfg: TrainConfig, device: torch.device) -> None:
    """TF32 matmuls/convolutions and cuDNN autotuning where available (off in deterministic mode)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and not cfg.deterministic


def prepare_method(method: Method, cfg: TrainConfig, compile_backend: str | Callable = "inductor") -> Method:
    """Apply channels_last in place; with ``compile`` and a method that steps optimizers inside its step, compile
    its networks' forwards (modules exposing ``forward_taps``; compiled modules keep clean state_dict keys). Other
    methods have their whole step compiled by :class:`StepRunner`."""
    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    if cfg.compile and method.manual_optimization:
        for module in method.modules():
            if hasattr(module, "forward_taps"):
                options = compile_options(cfg.compile_mode, compile_backend)
                module.compile(**options)
                module.forward_taps = torch.compile(module.forward_taps, **options)
    return method


def compile_options(mode: str, backend: str | Callable) -> dict:
    """``torch.compile`` keywords: ``mode`` for the inductor backend, else the ``backend`` itself."""
    return {"mode": mode} if backend == "inductor" else {"backend": backend}


def sum_losses(losses: dict[str, Tensor]) -> Tensor:
    """The total a step backpropagates: every loss term except the logged ``stat/...`` values."""
    return sum(v for k, v in losses.items() if not k.startswith("stat/"))


LossFunction = Callable[[Tensor | list[Tensor], Tensor, int, dict[str, float] | None], tuple[dict[str, Tensor], Tensor]]


def loss_function(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> LossFunction:
    """``(images, labels, epoch, scalars) -> (losses, total)``: the cohort's forward under autocast and the summed
    loss, the part of a step that ``train.compile`` compiles (``model``: the method or its DDP wrapper)."""

    def losses_and_total(images, labels, epoch, scalars):
        with autocast(cfg, device):
            losses = model(images, labels, epoch, scalars)
        return losses, sum_losses(losses)

    return losses_and_total


def compile_loss_function(
    fn: LossFunction, mode: str = "default", backend: str | Callable = "inductor", fullgraph: bool = False
) -> LossFunction:
    """``torch.compile`` of :func:`loss_function` (``mode`` applies to the inductor backend; ``reduce-overhead``
    captures CUDA graphs, which needs the whole step in one graph: every registered method's is)."""
    compiled = torch.compile(fn, fullgraph=fullgraph, **compile_options(mode, backend))
    if "reduce-overhead" not in mode or backend != "inductor":
        return compiled

    def step_of_cuda_graphs(images, labels, epoch, scalars):
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed: reuse their memory
        return compiled(images, labels, epoch, scalars)

    return step_of_cuda_graphs


def autocast(cfg: TrainConfig, device: torch.device):
    """The autocast context of the configured precision (a no-op for fp32)."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[cfg.precision])


class StepRunner:
    """Forward the cohort, backpropagate the summed loss dict once, step every optimizer."""

    def __init__(
        self,
        method: Method,
        optimizers: list[torch.optim.Optimizer],
        cfg: TrainConfig,
        device: torch.device,
        schedulers: list | None = None,
        compile_backend: str | Callable = "inductor",
        compile_fullgraph: bool = False,
    ) -> None:
        """``compile_backend`` / ``compile_fullgraph``: how ``cfg.compile`` compiles the step (tests use
        ``aot_eager`` and ``fullgraph=True``, which fails on any graph break)."""
        self.method = method
        self.model: torch.nn.Module = method  # what is called for the forward (a DDP wrapper when distributed)
        self.optimizers = optimizers
        self.schedulers = schedulers or []
        self.cfg = cfg
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        self.compile_backend, self.compile_fullgraph = compile_backend, compile_fullgraph
        self._losses: LossFunction | None = None  # built at the first step (after a DDP wrap)
        self.world_size = 1  # processes taking part in each step (set by wrap_distributed)

    def wrap_distributed(self, dist, cfg: TrainConfig) -> None:
        """Wrap the whole cohort in one DistributedDataParallel so all gradients share buckets. A method that steps
        its optimizers itself wraps each of its networks separately (``Method.ddp_per_network``), keeps the one
        wrapper in step itself (``Method.ddp_manual_step``), or is refused."""
        from torch.nn.parallel import DistributedDataParallel

        manual = self.method.manual_optimization
        per_network = getattr(self.method, "ddp_per_network", False)
        if manual and not (per_network or getattr(self.method, "ddp_manual_step", False)):
            raise ConfigError(
                "this method configuration steps its optimizers one by one within a step (e.g. DML's "
                "method.alternate_updates=true), which DistributedDataParallel cannot synchronise; run it in "
                "one process or switch that option off"
            )
        if cfg.sync_bn:
            if self.device.type != "cuda":
                raise ConfigError("train.sync_bn=true needs CUDA devices (SyncBatchNorm has no CPU kernel)")
            self.method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        self.world_size = dist.world_size

        def wrap(module: torch.nn.Module) -> torch.nn.Module:
            return DistributedDataParallel(
                module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )

        if manual and per_network:
            self.method.distribute_networks(wrap)
            return
        ignored = getattr(self.method, "ddp_ignored_parameters", lambda: [])()
        if ignored:  # gradients the method averages itself (average_across_processes)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.method, ignored)
        self._losses = None  # the step's function is rebuilt over the wrapper
        self.model = wrap(self.method)

    def average_across_processes(self, tensors: list[Tensor]) -> list[Tensor]:
        """The mean of each tensor over the processes (one all-reduce; the tensors themselves in one process): for
        gradients a ``manual_step`` computes outside DDP's backward, so that every rank steps with the same ones."""
        if self.world_size == 1 or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat /= self.world_size
        return [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]

    def zero_grad(self, index: int | None = None) -> None:
        for opt in self.optimizers if index is None else [self.optimizers[index]]:
            opt.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step_optimizer(self, index: int | list[int] | None = None) -> None:
        """Step one optimizer, several (a list of indices, in that order) or all; with fp16 through the grad
        scaler, updated once after each call."""
        chosen = [index] if isinstance(index, int) else index
        for opt in self.optimizers if chosen is None else [self.optimizers[i] for i in chosen]:
            if self.scaler is None:
                opt.step()
            else:
                self.scaler.step(opt)
        if self.scaler is not None:
            self.scaler.update()

    def loss_function(self) -> LossFunction:
        """The step's (compiled, with ``cfg.compile``) :func:`loss_function` over ``self.model``."""
        if self._losses is None:
            fn = loss_function(self.model, self.cfg, self.device)
            if self.cfg.compile:
                fn = compile_loss_function(fn, self.cfg.compile_mode, self.compile_backend, self.compile_fullgraph)
            self._losses = fn
        return self._losses

    def step(self, images: Tensor | list[Tensor], labels: Tensor, epoch: int) -> tuple[dict[str, Tensor], Tensor]:
        if self.method.manual_optimization:
            with autocast(self.cfg, self.device):
                losses = self.method.manual_step(images, labels, epoch, self)
            total = sum_losses(losses)
        else:
            scalars = self.method.epoch_scalars(epoch) or None
            losses, total = self.loss_function()(images, labels, epoch, scalars)
            self.zero_grad()
            self.backward(total)
            self.step_optimizer()
        for sched in self.schedulers:
            sched.step()
        self.method.after_optimizer_step()
        return losses, total

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
