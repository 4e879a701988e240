"""Attention programs written the ways real code writes them: (name, fn, inputs, expected facts).

Each entry exists for a spelling seen in a real model; the comment says which.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

B, H, T, D = 2, 3, 8, 4


def qkv(L: int = T, S: int = T, d: int = D, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, d, generator=g), torch.randn(B, H, S, d, generator=g), torch.randn(B, H, S, d, generator=g))


def causal_bool(L: int = T) -> torch.Tensor:
    return torch.tril(torch.ones(L, L, dtype=torch.bool))


# nanoGPT / minGPT: q @ k.transpose(-2, -1) * (1/sqrt(d))
def matmul_mul(q, k, v):
    return torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1))), dim=-1) @ v


# "Attention is all you need" tutorials: torch.matmul(...) / sqrt(d)
def matmul_div(q, k, v):
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.size(-1))
    return torch.matmul(F.softmax(scores, dim=-1), v)


# pre-scaled queries (fairseq, HF T5-like code that scales q)
def prescaled_q(q, k, v):
    q = q * q.size(-1) ** -0.5
    return (q @ k.mT).softmax(dim=-1) @ v


# unscaled (T5)
def unscaled(q, k, v):
    return F.softmax(q.matmul(k.transpose(-1, -2)), dim=3).matmul(v)


# additive float mask, mask written first (`mask + scores`)
def additive_mask_first(q, k, v, mask):
    return torch.softmax(mask + q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v


# boolean causal mask with masked_fill(-inf)
def masked_fill_causal(q, k, v):
    T_ = q.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    mask = torch.tril(torch.ones(T_, T_, dtype=torch.bool, device=q.device))
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# causal mask with dropout on the weights (train-mode code path, p given)
def with_dropout_p0(q, k, v):
    w = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
    return F.dropout(w, p=0.0, training=True) @ v


# 3-D bmm layout [B*H, T, D] (GPT-2 era, fairseq)
def bmm_3d(q, k, v):
    q3, k3, v3 = (x.reshape(-1, x.size(-2), x.size(-1)) for x in (q, k, v))
    w = torch.bmm(q3, k3.transpose(1, 2)) * 0.5
    return torch.bmm(w.softmax(-1), v3).reshape(q.shape)


# einsum (performer/x-transformers style)
def einsum_form(q, k, v):
    w = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.5
    return torch.einsum("bhqk,bhkd->bhqd", w.softmax(dim=-1), v)


# SDPA calls (HF attn_implementation="sdpa")
def sdpa_plain(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)


def sdpa_bool_causal_mask(q, k, v):
    mask = torch.tril(torch.ones(q.size(-2), k.size(-2), dtype=torch.bool))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


SPELLINGS = [
    # name, fn, extra inputs builder, expected mask kind, expected scale
    ("matmul_mul", matmul_mul, lambda: (), "none", 0.5),
    ("matmul_div", matmul_div, lambda: (), "none", 0.5),
    ("prescaled_q", prescaled_q, lambda: (), "none", 0.5),
    ("unscaled", unscaled, lambda: (), "none", 1.0),
    ("additive_mask_first", additive_mask_first, lambda: (torch.randn(1, 1, T, T),), "dense", 0.5),
    ("masked_fill_causal", masked_fill_causal, lambda: (), "causal", 0.5),
    ("with_dropout_p0", with_dropout_p0, lambda: (), "none", 0.5),
    ("bmm_3d", bmm_3d, lambda: (), "none", 0.5),
    ("einsum_form", einsum_form, lambda: (), "none", 0.5),
    ("sdpa_plain", sdpa_plain, lambda: (), "none", 0.5),
    ("sdpa_causal", sdpa_causal, lambda: (), "causal", 0.3),
    ("sdpa_bool_causal_mask", sdpa_bool_causal_mask, lambda: (), "causal", 0.5),
]


# BLOOM: ALiBi bias and scores in one baddbmm on [B*H, L, S]
def baddbmm_alibi(q, k, v):
    BH, S = q.size(0) * q.size(1), k.size(-2)
    q3, k3, v3 = (x.reshape(BH, x.size(-2), x.size(-1)) for x in (q, k, v))
    slopes = torch.tensor([0.5, 0.25, 0.125]).repeat(q.size(0)).reshape(BH, 1, 1)
    alibi = slopes * torch.arange(S).reshape(1, 1, S).float()
    scores = alibi.baddbmm(q3, k3.transpose(1, 2), beta=1.0, alpha=0.5)
    return torch.bmm(torch.softmax(scores, dim=-1), v3).reshape(q.shape)


SPELLINGS.append(("baddbmm_alibi", baddbmm_alibi, lambda: (), "alibi", 0.5))
