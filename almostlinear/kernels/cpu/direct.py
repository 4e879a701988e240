"""Directly weighted blocks (the causal diagonal chunks and the banded regime): P(s) on a block of scores.

Queries qc [B, Hk, G, Ci, D] against keys kc [B, Hk, Cj, D] with values vaug = [v | 1] [B, Hk, Cj, Dv+1] and the
block multiplier M [.., Ci, Cj] (mask, ALiBi factor, key weights; CallContext.block_multiplier).
"""
from __future__ import annotations

from ..features import evaluate_polynomial, evaluate_polynomial_derivative
from .context import augment_values


def direct_block(cx, i0, i1, j0, j1):
    """(qc, kc, vaug, M, s, W) of queries i0..i1 against keys j0..j1: scores s = scale q.k and weights
    W = P(s) * M, both [B, Hk, G, Ci, Cj]."""
    qc, kc, va = cx.q5[:, :, :, i0:i1], cx.k[:, :, j0:j1], augment_values(cx.v[:, :, j0:j1], None)
    M = cx.block_multiplier(i0, i1, j0, j1)
    B, Hk, G, Ci, D = qc.shape
    s = (qc.reshape(B, Hk, G * Ci, D) @ kc.transpose(-1, -2)).mul_(cx.scale).view(B, Hk, G, Ci, -1)
    W = evaluate_polynomial(s, cx.coeffs) * M
    return qc, kc, va, M, s, W


def block_numerator(W, vaug):
    """[num | den] = W [v | 1]: [B, Hk, G, Ci, Dv+1]."""
    B, Hk, G, Ci, _ = W.shape
    return (W.view(B, Hk, G * Ci, -1) @ vaug).view(B, Hk, G, Ci, -1)


def block_backward(cx, qc, kc, vaug, M, gd, s, W):
    """dq [B, Hk, G, Ci, D], dk [B, Hk, Cj, D], dv [B, Hk, Cj, Dv] of a block, given Gd [B, Hk, G, Ci, Dv+1] and
    the block's s, W from :func:`direct_block`."""
    B, Hk, G, Ci, D = qc.shape
    gd2 = gd.reshape(B, Hk, G * Ci, -1)
    dW = (gd2 @ vaug.transpose(-1, -2)).view(B, Hk, G, Ci, -1) * M
    ds = (dW * evaluate_polynomial_derivative(s, cx.coeffs)).mul_(cx.scale).view(B, Hk, G * Ci, -1)
    q2 = qc.reshape(B, Hk, G * Ci, D)
    dq = (ds @ kc).view(B, Hk, G, Ci, D)
    dk = ds.transpose(-1, -2) @ q2
    dv = W.view(B, Hk, G * Ci, -1).transpose(-1, -2) @ gd2[..., :cx.Dv]
    return dq, dk, dv
