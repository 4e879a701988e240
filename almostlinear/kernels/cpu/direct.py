"""Directly weighted blocks (the causal diagonal chunks and the banded regime): P(s) on a block of scores.

Queries qc [..., G, Ci, D] against keys kc [..., Cj, D] with values vaug = [v | 1] [..., Cj, Dv+1] and the block
multiplier M broadcastable to [..., G, Ci, Cj] (mask, ALiBi factor, key weights; CallContext.block_multiplier
and diagonal_multiplier).  The leading dims are [B, Hk] for a band and [g, B, Hk] for a block of diagonal
chunks.
"""
from __future__ import annotations

from ..features import evaluate_polynomial, evaluate_polynomial_derivative
from .context import augment_values


def direct_block(cx, i0, i1, j0, j1):
    """(qc, kc, vaug, M, s, W) of queries i0..i1 against keys j0..j1 (a band)."""
    qc, kc, va = cx.q5[:, :, :, i0:i1], cx.k[:, :, j0:j1], augment_values(cx.v[:, :, j0:j1])
    M = cx.block_multiplier(i0, i1, j0, j1)
    s, W = direct_weights(cx, qc, kc, M)
    return qc, kc, va, M, s, W


def direct_weights(cx, qc, kc, M):
    """Scores s = scale q.k and weights W = P(s) * M, both [..., G, Ci, Cj]; W is 0 wherever M is, even where s
    is not a number (a NaN key must not reach the earlier queries of its chunk as P(NaN) * 0 = NaN: eager's
    masked softmax gives them finite values)."""
    *lead, G, Ci, D = qc.shape
    s = (qc.reshape(*lead, G * Ci, D) @ kc.transpose(-1, -2)).mul_(cx.scale).view(*lead, G, Ci, -1)
    return s, evaluate_polynomial(s, cx.coeffs).mul_(M).masked_fill_(M == 0, 0.0)


def block_numerator(W, vaug):
    """[num | den] = W [v | 1]: [..., G, Ci, Dv+1]."""
    *lead, G, Ci, Cj = W.shape
    return (W.view(*lead, G * Ci, Cj) @ vaug).view(*lead, G, Ci, -1)


def block_backward(cx, qc, kc, vaug, M, gd, s, W):
    """dq [..., G, Ci, D], dk [..., Cj, D], dv [..., Cj, Dv] of a block, given Gd [..., G, Ci, Dv+1] and the
    block's s, W from :func:`direct_weights`."""
    *lead, G, Ci, D = qc.shape
    gd2 = gd.reshape(*lead, G * Ci, -1)
    dW = (gd2 @ vaug.transpose(-1, -2)).view(*lead, G, Ci, -1).mul_(M)
    ds = dW.mul_(evaluate_polynomial_derivative(s, cx.coeffs)).mul_(cx.scale).masked_fill_(M == 0, 0.0)
    ds = ds.view(*lead, G * Ci, -1)
    dq = (ds @ kc).view(*lead, G, Ci, D)
    dk = ds.transpose(-1, -2) @ qc.reshape(*lead, G * Ci, D)
    dv = W.view(*lead, G * Ci, -1).transpose(-1, -2) @ gd2[..., :cx.Dv]
    return dq, dk, dv
