"""One optimisation step of a cohort, with the precision/layout/compile switches of ``train``."""

from __future__ import annotations

import contextlib

import torch
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


def prepare_method(method: Method, cfg: TrainConfig) -> Method:
    """Apply channels_last and torch.compile in place (compiled modules keep clean state_dict keys)."""
    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    if cfg.compile:
        for module in method.modules():
            if hasattr(module, "forward_taps"):
                module.compile(mode=cfg.compile_mode)
                module.forward_taps = torch.compile(module.forward_taps, mode=cfg.compile_mode)
    return method


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
    ) -> None:
        self.method = method
        self.model: torch.nn.Module = method  # what is called for the forward (a DDP wrapper when distributed)
        self.optimizers = optimizers
        self.schedulers = schedulers or []
        self.cfg = cfg
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None

    def wrap_distributed(self, dist, cfg: TrainConfig) -> None:
        """Wrap the whole cohort in one DistributedDataParallel so all gradients share buckets."""
        from torch.nn.parallel import DistributedDataParallel

        if self.method.manual_optimization:
            raise ConfigError(
                "this method configuration steps its optimizers one by one within a step (e.g. DML's "
                "method.alternate_updates=true), which DistributedDataParallel cannot synchronise; run it in "
                "one process or switch that option off"
            )
        if cfg.sync_bn:
            if self.device.type != "cuda":
                raise ConfigError("train.sync_bn=true needs CUDA devices (SyncBatchNorm has no CPU kernel)")
            self.method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        self.model = DistributedDataParallel(
            self.method,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )

    def zero_grad(self, index: int | None = None) -> None:
        for opt in self.optimizers if index is None else [self.optimizers[index]]:
            opt.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step_optimizer(self, index: int | None = None) -> None:
        """Step one optimizer (or all); with fp16 through the grad scaler, updated after each call."""
        for opt in self.optimizers if index is None else [self.optimizers[index]]:
            if self.scaler is None:
                opt.step()
            else:
                self.scaler.step(opt)
        if self.scaler is not None:
            self.scaler.update()

    def step(self, images: Tensor | list[Tensor], labels: Tensor, epoch: int) -> tuple[dict[str, Tensor], Tensor]:
        if self.method.manual_optimization:
            with autocast(self.cfg, self.device):
                losses = self.method.manual_step(images, labels, epoch, self)
            total = sum(v for k, v in losses.items() if not k.startswith("stat/"))
        else:
            with autocast(self.cfg, self.device):
                losses = self.model(images, labels, epoch)
            total = sum(v for k, v in losses.items() if not k.startswith("stat/"))
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
