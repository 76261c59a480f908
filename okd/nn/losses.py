"""Loss building blocks shared by every method (``docs/methods.md#notation-and-shared-blocks``).

No function here detaches anything implicitly: ``kl_div_t`` takes an explicit ``detach_target``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def at_least_float32(x: Tensor) -> Tensor:
    """float16/bfloat16 (autocast) -> float32; float32 and float64 unchanged (float64 parity checks stay exact)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def kl_div_t(
    student_logits: Tensor,
    target_logits: Tensor,
    temperature: float,
    *,
    detach_target: bool,
    scale_t2: bool = True,
    target_eps: float = 0.0,
) -> Tensor:
    """KL_T(target -> student): T^2 * (1/B) sum_b sum_k q (log q - log p), q = softmax(z_t/T), p = softmax(z_s/T).

    Batch-mean reduction (sum over classes, divide by B). ``target_eps`` adds a constant to q before the
    log (the OKDDip/FFL/CMFF repos use 1e-7). Computed in float32 (float64 for float64 inputs).
    """
    if detach_target:
        target_logits = target_logits.detach()
    t = float(temperature)
    log_p = F.log_softmax(at_least_float32(student_logits) / t, dim=1)
    if target_eps:
        q = F.softmax(at_least_float32(target_logits) / t, dim=1) + target_eps
        kl = (q * (q.log() - log_p)).sum(dim=1).mean()
    else:
        log_q = F.log_softmax(at_least_float32(target_logits) / t, dim=1)
        kl = (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()
    return kl * (t * t) if scale_t2 else kl


def attention_map(features: Tensor) -> Tensor:
    """att(F) = (1/C) sum_c F_c^2: channel mean of squared activations, shape B x 1 x H x W."""
    return features.float().pow(2).mean(dim=1, keepdim=True)


def l2_normalize_per_sample(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Flatten each sample and divide by max(||x_b||_2, eps)."""
    flat = x.float().flatten(1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(eps)


def normalized_l2(a: Tensor, b: Tensor) -> Tensor:
    """NL2(a, b) = mean_{b,j} (a_hat - b_hat)^2 with per-sample L2 normalisation (element mean)."""
    return (l2_normalize_per_sample(a) - l2_normalize_per_sample(b)).pow(2).mean()


def sigmoid_rampup(epoch: float, length: float) -> float:
    """w(e; L) = exp(-5 (1 - clip(e, 0, L)/L)^2); 1 when L == 0."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(float(epoch), 0.0), float(length)) / float(length)
    return math.exp(-5.0 * phase * phase)


def ffsd_warmup(epoch_1based: int, length: int = 5) -> float:
    """FFSD's loss-weight warm-up: exp(-5 (1 - e/5)^2) for the 1-based epoch e <= 5, then 1."""
    return sigmoid_rampup(epoch_1based, length)


def rampup_0based(epoch_0based: int, length: int = 80) -> float:
    """The mean-teacher ramp-up of ONE, CL-ILR, OKDDip, FFL, PCL, CMFF: 0-based epoch, length 80."""
    return sigmoid_rampup(epoch_0based, length)


def ramped_kl_weight(params, epoch: int) -> dict[str, float]:
    """``{"kl_weight": kl_weight * rampup_0based(epoch, rampup_length)}`` of a method's parameters: the epoch
    scalars (``Method.epoch_scalars``) of the methods whose KL terms ramp up (ONE, CL-ILR, OKDDip, FFL, CMFF)."""
    return {"kl_weight": params.kl_weight * rampup_0based(epoch, params.rampup_length)}


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Batch-mean cross-entropy, computed in float32 (float64 for float64 logits)."""
    return F.cross_entropy(at_least_float32(logits), labels)


def logit_mean(logits: list[Tensor]) -> Tensor:
    """Mean of logits (used by DML/ONE ensembles and FFSD's z_ens)."""
    return torch.stack(logits).mean(dim=0)


def softmax_ensemble(logits: list[Tensor]) -> Tensor:
    """A true ensemble: log of the mean of softmax probabilities (argmax = ensemble prediction)."""
    probs = torch.stack([F.softmax(z.float(), dim=1) for z in logits]).mean(dim=0)
    return probs.clamp_min(1e-12).log()
