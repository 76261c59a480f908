"""The contrastive block of MCL and L-MCL (okd/nn/contrastive.py) against its equations, written as loops.

The references below use plain Python loops over anchors and columns, written from the equations of
``docs/methods.md#mcl`` and independently of the vectorised code.
"""

from __future__ import annotations

import math

import pytest
import torch

from okd.errors import DataError
from okd.nn.contrastive import Embed, check_positives, similarity, soft_contrast, sup_contrast

TAU, T = 0.1, 3.0
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])


def unit_rows(b: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def sc_loop(s: torch.Tensor, y: list[int], w: list[float], instance_positive: bool = False) -> float:
    """-(1/B) sum_r w_r (1/|P_r|) sum_{c in P_r} (S_rc - log sum_{k in O_r} exp S_rk)."""
    b = len(y)
    total = 0.0
    for r in range(b):
        denom = [k for k in range(b) if instance_positive or k != r]
        log_denom = math.log(sum(math.exp(float(s[r, k])) for k in denom))
        pos = [c for c in range(b) if y[c] == y[r] and (instance_positive or c != r)]
        total += w[r] * sum(float(s[r, c]) - log_denom for c in pos) / len(pos)
    return -total / b


def skl_loop(s_s: torch.Tensor, s_t: torch.Tensor, w: list[float], t: float) -> float:
    """T^2 (1/B) sum_r w_r sum_c q_rc (log q_rc - log p_rc), softmax over every column of a row."""
    b = s_s.shape[0]
    total = 0.0
    for r in range(b):
        zq = sum(math.exp(float(s_t[r, c]) / t) for c in range(b))
        zp = sum(math.exp(float(s_s[r, c]) / t) for c in range(b))
        for c in range(b):
            q = math.exp(float(s_t[r, c]) / t) / zq
            p = math.exp(float(s_s[r, c]) / t) / zp
            total += w[r] * q * (math.log(q) - math.log(p))
    return t * t * total / b


def test_similarity_is_scaled_cosine():
    u, v = unit_rows(5, 4, 0), unit_rows(5, 4, 1)
    s = similarity(u, v, TAU)
    assert s.shape == (5, 5)
    for r in range(5):
        for c in range(5):
            assert float(s[r, c]) == pytest.approx(float(sum(u[r, i] * v[c, i] for i in range(4))) / TAU, rel=1e-12)
    assert torch.allclose(similarity(u, u, TAU).diagonal(), torch.full((5,), 1 / TAU, dtype=torch.float64))


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_sup_contrast_matches_loop(cross, weighted):
    u = unit_rows(8, 6, 2)
    v = unit_rows(8, 6, 3) if cross else u
    s = similarity(u, v, TAU)
    w = torch.linspace(0.3, 0.7, 8, dtype=torch.float64) if weighted else None
    got = sup_contrast(s, LABELS, w)
    want = sc_loop(s, LABELS.tolist(), (w if weighted else torch.ones(8)).tolist())
    assert float(got) == pytest.approx(want, rel=1e-12)


def test_sup_contrast_ignores_same_index_column_of_cross_matrix():
    """Changing S_rr of a cross-network matrix changes nothing (neither positive nor negative)."""
    s = similarity(unit_rows(8, 6, 4), unit_rows(8, 6, 5), TAU)
    moved = s.clone()
    moved.diagonal().add_(3.0)
    assert torch.equal(sup_contrast(s, LABELS), sup_contrast(moved, LABELS))
    assert not torch.equal(
        sup_contrast(s, LABELS, instance_positive=True), sup_contrast(moved, LABELS, instance_positive=True)
    )


def test_sup_contrast_instance_positive_variant_matches_loop():
    s = similarity(unit_rows(8, 6, 6), unit_rows(8, 6, 7), TAU)
    want = sc_loop(s, LABELS.tolist(), [1.0] * 8, instance_positive=True)
    assert float(sup_contrast(s, LABELS, instance_positive=True)) == pytest.approx(want, rel=1e-12)


def test_sup_contrast_one_pair_closed_form():
    """B = 2, one class: each anchor's only candidate is its positive, so the loss is 0 (log 1)."""
    s = torch.tensor([[10.0, 3.0], [-2.0, 10.0]], dtype=torch.float64)
    assert float(sup_contrast(s, torch.tensor([5, 5]))) == pytest.approx(0.0, abs=1e-15)


def test_sup_contrast_refuses_anchor_without_positive():
    s = similarity(unit_rows(4, 3, 8), unit_rows(4, 3, 8), TAU)
    with pytest.raises(DataError, match="m_per_class"):
        sup_contrast(s, torch.tensor([0, 0, 1, 2]))
    with pytest.raises(DataError, match=r"\[1, 2\]"):
        check_positives(torch.tensor([0, 0, 1, 2]))
    check_positives(torch.tensor([3, 1, 3, 1]))


def test_check_positives_is_skipped_while_torch_compile_traces(monkeypatch):
    """Under ``torch.compile`` tracing the host read is skipped: a batch with lonely classes passes unchecked."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert check_positives(torch.tensor([0, 0, 1, 2])) is None


@pytest.mark.parametrize("weighted", [False, True])
def test_soft_contrast_matches_loop(weighted):
    s_s = similarity(unit_rows(6, 5, 9), unit_rows(6, 5, 10), TAU)
    s_t = similarity(unit_rows(6, 5, 11), unit_rows(6, 5, 12), TAU)
    w = torch.linspace(0.2, 0.9, 6, dtype=torch.float64) if weighted else None
    want = skl_loop(s_s, s_t, (w if weighted else torch.ones(6)).tolist(), T)
    assert float(soft_contrast(s_s, s_t, T, w)) == pytest.approx(want, rel=1e-12)
    assert float(soft_contrast(s_t, s_t, T)) == pytest.approx(0.0, abs=1e-14)


def test_soft_contrast_keeps_diagonal():
    s_s = similarity(unit_rows(6, 5, 13), unit_rows(6, 5, 14), TAU)
    moved = s_s.clone()
    moved.diagonal().add_(1.0)
    assert not torch.equal(soft_contrast(s_s, s_s.flip(0), T), soft_contrast(moved, s_s.flip(0), T))


def test_gradients_target_detached_student_and_weight_live():
    u = unit_rows(8, 6, 15).requires_grad_()
    v = unit_rows(8, 6, 16).requires_grad_()
    w = torch.full((8,), 0.5, dtype=torch.float64, requires_grad=True)
    soft_contrast(similarity(u, u, TAU), similarity(v, v, TAU), T, w).backward()
    assert v.grad is None, "SKL's target must get no gradient"
    assert u.grad is not None and u.grad.abs().sum() > 0
    assert w.grad is not None and w.grad.abs().sum() > 0
    u.grad = None
    w.grad = None
    sup_contrast(similarity(u, v, TAU), LABELS, w).backward()
    assert u.grad.abs().sum() > 0 and v.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_weight_scales_each_anchor_linearly():
    s = similarity(unit_rows(8, 6, 17), unit_rows(8, 6, 18), TAU)
    one_hot = torch.zeros(8, dtype=torch.float64)
    one_hot[3] = 1.0
    parts = [float(sup_contrast(s, LABELS, torch.eye(8, dtype=torch.float64)[r])) for r in range(8)]
    assert sum(parts) == pytest.approx(float(sup_contrast(s, LABELS)), rel=1e-12)
    assert float(sup_contrast(s, LABELS, 2 * one_hot)) == pytest.approx(2 * parts[3], rel=1e-12)


def test_embed_shapes_norms_and_parameter_count():
    emb = Embed(64).double()
    # d*128 + 128 + 128*128 + 128 (methods-mcl.md 3.5: 24,832 for d = 64)
    assert sum(p.numel() for p in emb.parameters()) == 24_832
    out = emb(torch.randn(5, 64, dtype=torch.float64))
    assert out.shape == (5, 128) and out.dtype == torch.float64
    assert torch.allclose(out.norm(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-14)
    x = torch.randn(3, 64, dtype=torch.float64)
    z = emb.proj[2](torch.relu(emb.proj[0](x)))
    assert torch.allclose(emb(x), z / z.norm(dim=1, keepdim=True), rtol=1e-14, atol=0)
    with torch.no_grad():
        for p in emb.proj[2].parameters():
            p.zero_()
    assert torch.equal(emb(x), torch.zeros(3, 128, dtype=torch.float64)), "a zero row stays zero, not NaN"


def test_similarity_stays_float32_under_bf16_autocast():
    u = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(19)), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = similarity(u, u, TAU)
    assert s.dtype == torch.float32 and torch.equal(s, u @ u.t() / TAU)
