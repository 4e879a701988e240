"""Reference implementations that materialise the [L, S] weight matrix (the oracle for tests).

Weights (before row normalisation)::

    W_ij = K(s_ij) * key_weight_j * exp(m_h * (j - i)) * valid_ij,   s_ij = scale * q_i . k_j

with K = P (polynomial) for :func:`naive_poly_attention` and K = exp for :func:`naive_exact_attention`.
valid_ij: causal j <= i (top-left aligned, like SDPA is_causal); window w > 0: with causal
i - w < j <= i, without causal |i - j| < w.  out_i = sum_j W_ij v_j / sum_j W_ij, and a row whose
weights are all zero (every key masked) gives out_i = 0.
Shapes: q [B, Hq, L, D], k [B, Hk, S, D], v [B, Hk, S, Dv] -> [B, Hq, L, Dv] (q.dtype).
"""
from __future__ import annotations

import torch

from .features import evaluate_polynomial, validate_polynomial

__all__ = ["naive_poly_attention", "naive_exact_attention", "naive_window_attention", "structure_log_bias"]


def structure_log_bias(L: int, S: int, *, causal: bool, window: int, alibi_slopes, device,
                       dtype=torch.float32) -> torch.Tensor:
    """Log-weights from the structure: [Hq or 1, L, S], -inf where invalid; ALiBi m_h*(j - i) added.

    The valid set is written out here on purpose, not taken from key_mask.allowed_keys that the kernels and the
    exact fallback share: the oracle stays independent of the code the tests check against it."""
    i = torch.arange(L, device=device).unsqueeze(-1)
    j = torch.arange(S, device=device).unsqueeze(0)
    valid = torch.ones(L, S, dtype=torch.bool, device=device)
    if causal:
        valid &= j <= i
        if window > 0:
            valid &= j > i - window
    elif window > 0:
        valid &= (i - j).abs() < window
    bias = torch.zeros(L, S, dtype=dtype, device=device).masked_fill(~valid, float("-inf"))
    bias = bias.unsqueeze(0)
    if alibi_slopes is not None:
        rel = (j - i).to(dtype)
        bias = bias + alibi_slopes.to(dtype).reshape(-1, 1, 1) * rel
    return bias


def _naive(q, k, v, kernel, *, scale, causal, key_weight, alibi_slopes, window):
    B, Hq, L, D = q.shape
    Hk = k.shape[1]
    S = k.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    if Hq != Hk:
        kf = kf.repeat_interleave(Hq // Hk, dim=1)
        vf = vf.repeat_interleave(Hq // Hk, dim=1)
    s = scale * (qf @ kf.transpose(-1, -2))                      # [B, Hq, L, S]
    logb = structure_log_bias(L, S, causal=causal, window=window, alibi_slopes=alibi_slopes,
                              device=q.device, dtype=cdt).unsqueeze(0)  # [1, Hq|1, L, S]
    if key_weight is not None:
        logb = logb + torch.log(key_weight.to(cdt)).reshape(B, 1, 1, S)
    if kernel == "exp":
        logits = s + logb
    else:
        logits = logb
    m = logits.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    w = torch.exp(logits - m)                                     # 0 where invalid
    if kernel != "exp":
        w = w * kernel(s)
    den = w.sum(-1, keepdim=True)
    ok = den > 0
    out = (w @ vf) / torch.where(ok, den, torch.ones_like(den))
    out = torch.where(ok, out, torch.zeros_like(out))
    return out.to(q.dtype)


def naive_poly_attention(q, k, v, *, scale: float, degree: int = 2, coefficients=None, causal: bool = False,
                         key_weight=None, alibi_slopes=None, window: int = 0) -> torch.Tensor:
    """Reference polynomial attention (materialises [B, Hq, L, S]; differentiable by autograd)."""
    coeffs = validate_polynomial(degree, coefficients)
    return _naive(q, k, v, lambda s: evaluate_polynomial(s, coeffs), scale=scale, causal=causal,
                  key_weight=key_weight, alibi_slopes=alibi_slopes, window=window)


def naive_exact_attention(q, k, v, *, scale: float, causal: bool = False, key_weight=None,
                          alibi_slopes=None, window: int = 0) -> torch.Tensor:
    """Reference softmax attention with the same mask / bias semantics (fully masked row -> 0)."""
    return _naive(q, k, v, "exp", scale=scale, causal=causal, key_weight=key_weight,
                  alibi_slopes=alibi_slopes, window=window)


def naive_window_attention(q, k, v, *, scale: float, exact_window: int, degree: int = 2, coefficients=None,
                           causal: bool = False, key_weight=None, alibi_slopes=None,
                           window: int = 0) -> torch.Tensor:
    """Reference polynomial attention with an exact window: weight exp(s) on the keys j with i - W < j <= i
    (causal) or |i - j| < W (otherwise), P(s) on the other allowed keys, one normaliser (materialises [L, S];
    differentiable by autograd).  Rows are shifted by the row maximum of the log-weights (detached)."""
    coeffs = validate_polynomial(degree, coefficients)
    B, Hq, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    if Hq != Hk:
        kf, vf = kf.repeat_interleave(Hq // Hk, dim=1), vf.repeat_interleave(Hq // Hk, dim=1)
    s = scale * (qf @ kf.transpose(-1, -2))
    logb = structure_log_bias(L, S, causal=causal, window=window, alibi_slopes=alibi_slopes, device=q.device,
                              dtype=cdt).unsqueeze(0)
    if key_weight is not None:
        logb = logb + torch.log(key_weight.to(cdt)).reshape(B, 1, 1, S)
    i = torch.arange(L, device=q.device).unsqueeze(-1)
    j = torch.arange(S, device=q.device).unsqueeze(0)
    near = ((j <= i) & (j > i - exact_window)) if causal else (i - j).abs() < exact_window
    allowed = torch.isfinite(logb) & near
    s_safe = torch.where(torch.isfinite(logb), s, torch.zeros_like(s))
    log_exact = torch.where(allowed, s_safe + logb, torch.full_like(s, float("-inf")))
    poly = evaluate_polynomial(s_safe, coeffs)
    log_poly = torch.where(near, torch.full_like(s, float("-inf")), torch.log(poly.clamp_min(1e-300)) + logb)
    # the row's largest log-weight (exact on the near keys, log P(s) + bias on the others): no underflow in fp32
    m = torch.maximum(log_exact.amax(-1, keepdim=True), log_poly.amax(-1, keepdim=True))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    w = torch.where(near, torch.exp(log_exact - m), poly * torch.exp(logb - m))
    den = w.sum(-1, keepdim=True)
    ok = den > 0
    out = (w @ vf) / torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok, out, torch.zeros_like(out)).to(q.dtype)
