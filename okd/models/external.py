"""The user's own networks: load a factory by import path (``pkg.mod:build``) and adapt what it returns.

:class:`ExternalNet` wraps the user's ``nn.Module`` (kept untouched as ``self.net``) with the interface of
the registered backbones (``num_classes``; ``forward(x) -> logits``). :class:`TappedNet` adds
``forward_taps(x) -> (logits, taps)``: the outputs of the submodules named by ``model.taps``, captured by
forward hooks that live only for the duration of one call (no state is kept between calls). Both probe the
network once, in eval mode without gradients and with the RNG state restored, on a fixed 2 x 3 x S x S batch of
normal noise: the logits must be ``[2, num_classes]`` and every tap a 4-D feature map; the tap shapes are kept
(``tap_shapes``, C x H x W) so methods can check what they need before training (:mod:`okd.models.taps`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from okd.errors import ConfigError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def load_factory(path: str) -> Callable[..., Any]:
    """The callable named by ``'package.module:attribute'`` (imports the module: this runs its code)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise ConfigError(
            f"model.name={path!r} is neither a registered model nor an import path of the form "
            "'package.module:function' (e.g. my_nets.cnn:build); `okd models` lists the registered ones"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.split(".")[: len(exc.name.split("."))] == exc.name.split("."):
            raise ConfigError(
                f"model.name={path!r}: no module {exc.name!r} can be imported. Put the folder that holds "
                f"{module_name.replace('.', '/')}.py on PYTHONPATH (e.g. PYTHONPATH=$PWD okd train ...) or "
                "pip-install its package"
            ) from None
        raise ConfigError(f"model.name={path!r}: importing {module_name!r} failed: {_first_line(exc)}") from None
    except Exception as exc:  # the user's module raised while being imported
        raise ConfigError(f"model.name={path!r}: importing {module_name!r} failed: {_first_line(exc)}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise ConfigError(
                f"model.name={path!r}: module {module_name!r} has no attribute {attr!r}; its public callables: "
                f"{', '.join(names[:12]) or 'none'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model.name={path!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def call_factory(factory: Callable[..., Any], num_classes: int, kwargs: Mapping[str, Any], where: str) -> nn.Module:
    """``factory(num_classes=K, **kwargs)``, checked to be an ``nn.Module``."""
    try:
        net = factory(num_classes=num_classes, **dict(kwargs))
    except TypeError as exc:
        raise ConfigError(
            f"{where}: calling it as f(num_classes={num_classes}, **model.kwargs={dict(kwargs)}) failed: "
            f"{_first_line(exc)}. The callable must accept num_classes and the keys of model.kwargs"
        ) from None
    if not isinstance(net, nn.Module):
        raise ConfigError(
            f"{where} returned a {type(net).__name__}, not a torch.nn.Module; it must return the network "
            "(an nn.Module mapping B x 3 x H x W images to B x num_classes logits)"
        )
    return net


class _Capture:
    """Forward hooks on the named submodules for one call; the outputs are returned, not kept."""

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        self.modules = modules

    def run(self, net: nn.Module, x: Tensor) -> tuple[Any, list[Any]]:
        found: dict[str, Any] = {}

        def hook_for(name: str):
            def hook(_module, _inputs, output):
                found[name] = output

            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in self.modules]
        try:
            out = net(x)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n, _ in self.modules if n not in found]
        if missing:
            raise ConfigError(f"model.taps {missing} did not run in the network's forward; tap modules that run")
        return out, [found[n] for n, _ in self.modules]


def _device_of(net: nn.Module) -> torch.device:
    tensor = next(iter(net.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _probe(fn: Callable[[Tensor], Any], net: nn.Module, size: int) -> Any:
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            return fn(x.to(_device_of(net)))
    finally:
        net.train(was_training)


class ExternalNet(nn.Module):
    """The user's network ``net`` (``self.net``) as an okd backbone: ``forward(x) -> logits``."""

    def __init__(self, net: nn.Module, num_classes: int, *, name: str = "", input_size: int = 32) -> None:
        super().__init__()
        self.net = net
        self.num_classes = int(num_classes)
        self.model_name = name or type(net).__name__
        self.input_size = int(input_size)
        self._check(self._probe())

    def _probe(self) -> tuple[Any, list[Any]]:
        try:
            return _probe(lambda x: (self.net(x), []), self.net, self.input_size)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(self._probe_failed(exc)) from None

    def _probe_failed(self, exc: BaseException) -> str:
        return (
            f"model {self.model_name!r} fails on a 2 x 3 x {self.input_size} x {self.input_size} probe batch "
            f"({_first_line(exc)}); it must map images of the run's size (data.image_size for folder data) "
            "to logits"
        )

    def _check(self, probed: tuple[Any, list[Any]]) -> None:
        out = probed[0]
        if not isinstance(out, Tensor) or tuple(out.shape) != (2, self.num_classes):
            got = f"a tensor of shape {list(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
            raise ConfigError(
                f"model {self.model_name!r} returned {got} for a 2 x 3 x {self.input_size} x {self.input_size} "
                f"batch; it must return logits of shape [2, {self.num_classes}] (batch x num_classes). Return the "
                "classifier output alone (no tuple or dict), with num_classes outputs"
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TappedNet(ExternalNet):
    """An :class:`ExternalNet` with ``forward_taps``: the outputs of the submodules named in ``taps``."""

    def __init__(
        self, net: nn.Module, num_classes: int, taps: Sequence[str], *, name: str = "", input_size: int = 32
    ) -> None:
        if not taps:
            raise ConfigError("model.taps is empty; name the submodules whose outputs are the feature taps")
        modules = dict(net.named_modules())
        unknown = [t for t in taps if t not in modules or t == ""]
        if unknown:
            names = [n for n, _ in net.named_children()]
            raise ConfigError(
                f"model.taps {unknown} are not submodules of {name or type(net).__name__}; its top-level "
                f"submodules are {names} (nested ones are dotted, e.g. layer1.0)"
            )
        if len(set(taps)) != len(taps):
            raise ConfigError(f"model.taps {list(taps)} names a module twice")
        self.tap_names = list(taps)
        self._capture = _Capture([(t, modules[t]) for t in taps])
        super().__init__(net, num_classes, name=name, input_size=input_size)

    def _probe(self) -> tuple[Any, list[Any]]:
        try:
            return _probe(lambda x: self._capture.run(self.net, x), self.net, self.input_size)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(self._probe_failed(exc)) from None

    def _check(self, probed: tuple[Any, list[Any]]) -> None:
        super()._check(probed)
        bad = [
            f"{n}: {list(t.shape[1:]) if isinstance(t, Tensor) else type(t).__name__}"
            for n, t in zip(self.tap_names, probed[1], strict=True)
            if not isinstance(t, Tensor) or t.ndim != 4
        ]
        if bad:
            raise ConfigError(
                f"model.taps must name modules that output feature maps (B x C x H x W tensors); these do not: "
                f"{'; '.join(bad)}"
            )
        self.tap_shapes = [tuple(int(s) for s in t.shape[1:]) for t in probed[1]]
        self.tap_channels = tuple(s[0] for s in self.tap_shapes)
        self.feature_dim = self.tap_channels[-1]

    def forward_taps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self._capture.run(self.net, x)
