"""The global regime (non-causal, no window): one state for all queries.

Saug = phi_k(K)^T [f V | f] ([B, Hk, r, Gs*(Dv+1)], f = the key factor), out = phi_q(Q) Saug[:, :Dv] /
phi_q(Q) Saug[:, Dv].  Backward, one pass over the queries: den (matrix-vector products), Gd, dphi_q = Gd Saug^T
through phi's VJP to dq, and dSaug += phi_q^T Gd; then one over the keys: dX = phi_k dSaug, dphi_k = X dSaug^T.
Blocks of about BLOCK_ROWS rows (context.py), features feature-major (states.py).
"""
from __future__ import annotations

from .context import augment_values
from .states import (accumulate_product, apply, apply_denominator, apply_transposed, key_grads, query_state,
                     value_grads)


def _keys(cx, blk):
    """(keys^T [B, Hk, D, C], their features [B, Hk, r, C], X = [f v | f] [B, Hk, C, Gs*E], f) of a block."""
    kT = cx.k[:, :, blk.i0:blk.i1].transpose(-1, -2).contiguous()
    f = cx.global_key_factor(blk.i0, blk.i1)
    return kT, cx.phi(kT, "k"), augment_values(cx.v[:, :, blk.i0:blk.i1], f), f


def global_state(cx):
    """Saug = sum_j phi_k(k_j)^T [f_j v_j | f_j]: [B, Hk, r, Gs*(Dv+1)]."""
    state = None
    for blk in cx.blocks(cx.S, chunked=False):
        _, phk, X, _ = _keys(cx, blk)
        state = accumulate_product(state, phk, X)
    return state


def global_forward(cx, out, den):
    """Fills out [B, Hk, G, L, Dv] and den [B, Hk, G, L]; returns the state (the backward may reuse it)."""
    state = global_state(cx)
    for blk in cx.blocks(cx.L, chunked=False):
        i0, i1 = blk.i0, blk.i1
        num = apply(cx, cx.phi(cx.queries_t(cx.q5[:, :, :, i0:i1]), "q"), state)
        cx.store_normalised(cx.ungrouped(num, blk.C), out[:, :, :, i0:i1], den[:, :, :, i0:i1])
    return state


def global_backward(cx, dq, dk, dv, state):
    """Fills dq, adds to dk and dv; ``state`` from :func:`global_forward` (None: rebuilt)."""
    if state is None:
        state = global_state(cx)
    dstate = None
    for blk in cx.blocks(cx.L, chunked=False):
        i0, i1 = blk.i0, blk.i1
        qT = cx.queries_t(cx.q5[:, :, :, i0:i1])
        phq = cx.phi(qT, "q")
        den = apply_denominator(cx, phq, state).view(cx.B, cx.Hk, cx.G, blk.C)
        gd = cx.grouped(cx.grad_augmented(cx.g5[:, :, :, i0:i1], cx.o5[:, :, :, i0:i1], den))
        dqT = cx.vjp(qT, apply_transposed(cx, gd, state), "q")
        dq[:, :, :, i0:i1] = cx.ungrouped(dqT.transpose(-1, -2), blk.C)
        dstate = query_state(cx, phq, gd, into=dstate)
    for blk in cx.blocks(cx.S, chunked=False):
        kT, phk, X, f = _keys(cx, blk)
        dX, dkT = key_grads(cx, kT, phk, X, dstate)
        dk[:, :, blk.i0:blk.i1] += dkT.transpose(-1, -2)
        dv[:, :, blk.i0:blk.i1] += value_grads(cx, dX, f)
