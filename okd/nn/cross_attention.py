"""CMFF's two-way cross-attention block over two networks' feature vectors (``docs/methods.md#cmff``).

:class:`CrossAttentionFusion` takes one d-dimensional feature per network, x_1 and x_2 (B x d each), and
returns one updated feature per network. For network i (and its partner j = 1 - i):

    a_i = LN_in_i(x_i)                                   (pre-norm, one LayerNorm per network)
    Q_i, K_i, V_i = W^q_i a_i, W^k_i a_i, W^v_i a_i      (Linear d -> d with bias, per network)
    o_i = Drop_r(W^o_i Attn(Q_*, K_i, V_i))              (see ``query_from`` for Q_*; W^o_i Linear d -> d)
    y_i = c1_i x_i + c2_i o_i                            (residual on the *un-normalised* input)
    out_i = c3_i y_i + c4_i Drop_r(MLP_i(LN_mlp_i(y_i)))   MLP_i = Linear(d, r d) - GELU - Linear(r d, d)

c1..c4 are learnable scalars initialised to 1 (8 in all). Drop_r is ``resid_dropout`` (0.1) and the attention
weights get ``attn_dropout`` (0.1). What a *token* is (``layout``):

- ``"chunks"`` (the released CMFF code): the projected d-vectors are reshaped to h chunks of d/h, and the h
  chunks act as h tokens of one d/h-dimensional attention: Attn(Q, K, V) = softmax(Q K^T / sqrt(d/h)) V with
  Q, K, V of shape B x h x (d/h), so the attention map is h x h per sample.
- ``"single"``: each network's feature is one token and the attention is the textbook h-head attention
  (head size d/h). With a single key per query the softmax is identically 1, so the attention output is the
  value projection of the key/value network (the block degenerates to a gated MLP mixing of the two).

Which network queries (``query_from``):

- ``"other"`` (the released code): network i's update attends with the *partner's* queries over network i's
  own keys and values, Attn(Q_j, K_i, V_i);
- ``"own"`` (textbook cross-attention): network i's queries over the partner's keys and values,
  Attn(Q_i, K_j, V_j).

Init: every Linear N(0, ``linear_std``) with bias 0 (the CMFF VGG model's loop re-initialises the block's
Linears with std 0.01), LayerNorm 1/0, coefficients 1. The released block also holds modules it never uses
(two SE layers over 512 channels and two Linear(1024 -> 512)); they are not built here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LAYOUTS = ("chunks", "single")
QUERY_FROM = ("other", "own")


class LearnableCoefficient(nn.Module):
    """x -> c x with a learnable scalar c (init ``value``)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([float(value)]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class CrossAttentionFusion(nn.Module):
    """Two-way cross-attention between two networks' d-dimensional features (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        *,
        layout: str = "chunks",
        query_from: str = "other",
        mlp_ratio: int = 2,
        attn_dropout: float = 0.1,
        resid_dropout: float = 0.1,
        linear_std: float = 0.01,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if query_from not in QUERY_FROM:
            raise ValueError(f"query_from must be one of {QUERY_FROM}, got {query_from!r}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        self.dim, self.num_heads, self.layout, self.query_from = dim, num_heads, layout, query_from
        self.ln_in = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.q = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))
        self.k = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))
        self.v = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))
        self.out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))
        self.ln_mlp = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)) for _ in range(2)
        )
        # per network: [input residual, attention, post-attention residual, MLP]
        self.coef = nn.ModuleList(nn.ModuleList(LearnableCoefficient() for _ in range(4)) for _ in range(2))
        self.attn_drop = nn.Dropout(attn_dropout)
        self.resid_drop = nn.Dropout(resid_dropout)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, linear_std)
                nn.init.zeros_(m.bias)

    def _tokens(self, t: Tensor) -> Tensor:
        """B x d -> the attention's (B, groups, tokens, width) view."""
        b, h = t.shape[0], self.num_heads
        if self.layout == "chunks":
            return t.reshape(b, 1, h, self.dim // h)  # h tokens, one attention of width d/h
        return t.reshape(b, h, 1, self.dim // h)  # one token, h heads of width d/h

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(Q K^T / sqrt(width)) V in the ``layout``'s token view; returns B x d."""
        q, k, v = self._tokens(q), self._tokens(k), self._tokens(v)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return (self.attn_drop(att) @ v).reshape(q.shape[0], self.dim)

    def attention_weights(self, x1: Tensor, x2: Tensor) -> list[Tensor]:
        """The two softmax maps (before dropout), for inspection and tests: [update of net 1, of net 2]."""
        a = [ln(x) for ln, x in zip(self.ln_in, (x1, x2), strict=True)]
        maps = []
        for i in range(2):
            src = 1 - i if self.query_from == "other" else i
            kv = i if self.query_from == "other" else 1 - i
            q, k = self._tokens(self.q[src](a[src])), self._tokens(self.k[kv](a[kv]))
            maps.append(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1))
        return maps

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        xs = (x1, x2)
        a = [ln(x) for ln, x in zip(self.ln_in, xs, strict=True)]
        outs = []
        for i in range(2):
            src = 1 - i if self.query_from == "other" else i  # the network giving the queries
            kv = i if self.query_from == "other" else 1 - i  # the network giving keys and values
            o = self.resid_drop(self.out[i](self.attend(self.q[src](a[src]), self.k[kv](a[kv]), self.v[kv](a[kv]))))
            c = self.coef[i]
            y = c[0](xs[i]) + c[1](o)
            outs.append(c[2](y) + c[3](self.resid_drop(self.mlp[i](self.ln_mlp[i](y)))))
        return outs[0], outs[1]
