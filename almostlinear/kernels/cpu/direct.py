"""Directly weighted blocks (the causal diagonal chunks and the banded regime): P(s) on a block of scores.

qc [B, Hk, G, Ci, D] queries against kc [B, Hk, Cj, D] keys with values vaug = [v | 1] [B, Hk, Cj, Dv+1] and the
block multiplier M [.., Ci, Cj] (mask, ALiBi factor, key weights; CallContext.block_multiplier).
"""
from __future__ import annotations

from ..features import evaluate_polynomial, evaluate_polynomial_derivative


def block_weights(cx, qc, kc, M):
    """Scores s = scale q.k and weights W = P(s) * M, both [B, Hk, G, Ci, Cj]."""
    B, Hk, G, Ci, D = qc.shape
    s = (qc.reshape(B, Hk, G * Ci, D) @ kc.transpose(-1, -2)).mul_(cx.scale).view(B, Hk, G, Ci, -1)
    W = evaluate_polynomial(s, cx.coeffs) * M
    return s, W


def block_numerator(W, vaug):
    """[num | den] = W [v | 1]: [B, Hk, G, Ci, Dv+1]."""
    B, Hk, G, Ci, _ = W.shape
    return (W.view(B, Hk, G * Ci, -1) @ vaug).view(B, Hk, G, Ci, -1)


def block_backward(cx, qc, kc, vaug, M, gd, s, W):
    """dq [B, Hk, G, Ci, D], dk [B, Hk, Cj, D], dv [B, Hk, Cj, Dv] of a block, given Gd [B, Hk, G, Ci, Dv+1] and
    the block's s, W from :func:`block_weights`."""
    B, Hk, G, Ci, D = qc.shape
    gd2 = gd.reshape(B, Hk, G * Ci, -1)
    dW = (gd2 @ vaug.transpose(-1, -2)).view(B, Hk, G, Ci, -1) * M
    ds = (dW * evaluate_polynomial_derivative(s, cx.coeffs)).mul_(cx.scale).view(B, Hk, G * Ci, -1)
    q2 = qc.reshape(B, Hk, G * Ci, D)
    dq = (ds @ kc).view(B, Hk, G, Ci, D)
    dk = ds.transpose(-1, -2) @ q2
    dv = W.view(B, Hk, G * Ci, -1).transpose(-1, -2) @ gd2[..., :cx.Dv]
    return dq, dk, dv
