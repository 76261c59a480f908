"""What the method tests share (``from method_helpers import ...``; pytest puts ``tests/methods/`` on
``sys.path``): a method built from its ``Params`` on a small backbone (``make``), a fixed batch, gradient
probes, and the loss references written from the equations, independently of ``okd/nn/``."""

from __future__ import annotations

import math
import multiprocessing
import time
from pathlib import Path

import helpers
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okd.config import OptimConfig
from okd.methods.base import METHODS, MethodContext

K = 10


def make(name: str, model: str = "resnet20", seed: int = 0, **params) -> nn.Module:
    hp = METHODS.get(name).Params(**params)
    hp.validate()
    ctx = MethodContext(model=model, num_classes=K, optim=OptimConfig(), params=hp, epochs=300)
    torch.manual_seed(seed)
    return METHODS.get(name)(ctx)


def batch(n: int = 4, seed: int = 1, size: int = 16) -> tuple[Tensor, Tensor]:
    """Small images keep the tests fast: the CIFAR nets pool globally, so 16x16 inputs run unchanged."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, K, (n,), generator=g)


ref_kl, ref_ce = helpers.ref_kl, helpers.ref_ce


def summed(losses: dict[str, Tensor], pick=lambda k: True) -> Tensor:
    return sum(v for k, v in losses.items() if not k.startswith("stat/") and pick(k))


def grads_of(module: nn.Module) -> list[Tensor | None]:
    return [p.grad for p in module.parameters()]


def no_grad_in(module: nn.Module) -> bool:
    return all(p.grad is None or not p.grad.any() for p in module.parameters())


def some_grad_in(module: nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def close(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------- references written from the equations
def ramp(epoch: int) -> float:
    return math.exp(-5 * (1 - min(epoch, 80) / 80) ** 2)


def branch_outputs(m, x: Tensor, trunk_grad_scale: float = 1.0) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Trunk, final maps and logits of a ResNet multi-branch net, run by hand (ILR via a tensor hook)."""
    h = m.net.trunk(x)
    hb = h.view_as(h)
    if trunk_grad_scale != 1.0:
        hb.register_hook(lambda g: g * trunk_grad_scale)
    maps = [b["layer3"](hb) for b in m.net.branches]
    return h, maps, [b["fc"](f.mean((2, 3))) for b, f in zip(m.net.branches, maps, strict=True)]


def gate_ref(gate, h: Tensor) -> Tensor:
    a = F.linear(h.mean((2, 3)), gate.fc.weight, gate.fc.bias)
    a = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + gate.bn.eps) * gate.bn.weight + gate.bn.bias
    return torch.softmax(a.clamp_min(0), dim=1)


def fusion_ref(fusion, u: Tensor) -> tuple[Tensor, Tensor]:
    phi = fusion.relu2(fusion.bn2(fusion.conv2(fusion.relu1(fusion.bn1(fusion.conv1(u))))))
    return F.linear(phi.mean((2, 3)), fusion.fc.weight, fusion.fc.bias), phi


def att(f: Tensor) -> Tensor:
    return (f**2).mean(1).flatten(1)


def nl2(a: Tensor, b: Tensor) -> Tensor:
    return ((a / a.norm(dim=1, keepdim=True) - b / b.norm(dim=1, keepdim=True)) ** 2).mean()


def one_ref(m, x: Tensor, y: Tensor, epoch: int) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor]]:
    h, maps, z = branch_outputs(m, x)
    g = gate_ref(m.gate, h)
    z_e = sum(g[:, i : i + 1] * z[i] for i in range(len(z)))
    out = {f"branch{i}/ce": ref_ce(zi, y) for i, zi in enumerate(z)}
    out.update({f"branch{i}/kl": ramp(epoch) * ref_kl(zi, z_e, 3.0, 1e-7) for i, zi in enumerate(z)})
    out["teacher/ce"] = ref_ce(z_e, y)
    return out, maps, z


def sl_ref(m, x: Tensor, y: Tensor, epoch: int, maps: list[Tensor], z: list[Tensor]) -> dict[str, Tensor]:
    """FFSD's leader strategy: fusion over detached peer maps, leader with its decoder (T = 2, lambda 10)."""
    u = torch.cat([f.detach() for f in maps], 1)
    z_f, phi = fusion_ref(m.sl.fusion, u)
    z_l, taps = m.sl.leader.forward_taps(x)
    lam = 10 * math.exp(-5 * (1 - min(epoch + 1, 5) / 5) ** 2)
    return {
        "fusion/ce": ref_ce(z_f, y),
        "fusion/kl": ref_kl(z_f, (sum(z) / len(z)).detach(), 2.0),
        "leader/ce": ref_ce(z_l, y),
        "leader/kl": ref_kl(z_l, z_f.detach(), 2.0),
        "leader/fused_map": lam * nl2(att(taps[-1]), att(phi.detach())),
        "leader/decoder": lam * nl2(att(m.sl.decoder(taps[-1])), att(u)),
    }


# ---------------------------------------------------------------------------------------- PCL and KDCL
B = 4


def kl_manual(student: torch.Tensor, target: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 (1/B) sum_b sum_k q (log q - log p), written out."""
    q = torch.softmax(target / T, dim=1)
    return T * T * (q * (q.log() - torch.log_softmax(student / T, dim=1))).sum(dim=1).mean()


def ce_manual(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -(torch.log_softmax(z, dim=1).gather(1, y.view(-1, 1))).mean()


def views_batch(views: int, seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 32, 32, generator=g) for _ in range(views)], torch.tensor([0, 3, 7, 3])


def run_spawned_ranks(target, leading: tuple, tmp_path: Path, world: int, timeout: float = 90.0) -> list[dict]:
    """Run ``target(*leading, rank, store, out_dir)`` in ``world`` spawned processes and load what each saved as
    ``out_dir/rank<r>.pt``; a rank that waits on a collective the others never enter is killed after ``timeout``."""
    ctx = multiprocessing.get_context("spawn")
    args = [(*leading, r, str(tmp_path / "store"), str(tmp_path)) for r in range(world)]
    procs = [ctx.Process(target=target, args=a) for a in args]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"a rank did not finish in {timeout:.0f} s (waiting on a collective another rank never entered?)"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
