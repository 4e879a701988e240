"""The banded regime (window > 0): every query chunk against the band of keys it can see, P(s) directly in
d-space: O(L * (chunk + 2 * window) * D), linear in n for a fixed window.  ALiBi subtracts the row maximum."""
from __future__ import annotations

from .direct import block_backward, block_numerator, direct_block


def banded_forward(cx, out, den):
    """Fills out [B, Hk, G, L, Dv] and den [B, Hk, G, L]."""
    for i0, i1 in cx.spans(cx.L):
        _, _, va, _, _, W = direct_block(cx, i0, i1, *cx.band(i0, i1))
        num = block_numerator(W, va)
        cx.store_normalised(num[..., :cx.Dv], num[..., cx.Dv], out[:, :, :, i0:i1], den[:, :, :, i0:i1])


def banded_backward(cx, dq, dk, dv):
    """Adds the gradients to dq [B, Hk, G, L, D], dk and dv."""
    for i0, i1 in cx.spans(cx.L):
        j0, j1 = cx.band(i0, i1)
        qc, kc, va, M, s, W = direct_block(cx, i0, i1, j0, j1)
        gd = cx.grad_augmented(cx.g5[:, :, :, i0:i1], cx.o5[:, :, :, i0:i1], block_numerator(W, va)[..., cx.Dv])
        a, b, c = block_backward(cx, qc, kc, va, M, gd, s, W)
        dq[:, :, :, i0:i1] += a
        dk[:, :, j0:j1] += b
        dv[:, :, j0:j1] += c
