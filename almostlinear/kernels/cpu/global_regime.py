"""The global regime (non-causal, no window): one state for all queries.

S = phi_k(K)^T (f V) ([B, Hk, r, Gs*Dv], f = the key factor) and the keys' moments (kernels/moments.py);
out = phi_q(Q) S / den with den read from the moments.  Backward, one pass over the queries: den, Gd, dq (the
VJP of dphi_q = Gv S^T plus the moments' share), dS += phi_q^T Gv and the queries' moments; then one over the
keys: dX = phi_k dS, dphi_k = X dS^T, dk through the VJP and the query moments.  Blocks of about BLOCK_ROWS rows
(context.py), features feature-major (states.py).
"""
from __future__ import annotations

from .states import (States, apply, key_grads, key_moments, key_states, query_grads, query_states, read_denominator,
                     value_grads)


def _keys(cx, blk):
    """(keys^T [B, Hk, D, C], f [B, Hk, Gs, C] | None) of a block."""
    return cx.feature_major(cx.k[:, :, blk.i0:blk.i1], "kT"), cx.global_key_factor(blk.i0, blk.i1)


def _key_features(cx, blk):
    """(kT, their features [B, Hk, r, C], X = f v [B, Hk, C, Gs*Dv], f) of a block."""
    kT, f = _keys(cx, blk)
    return kT, cx.phi(kT, "k"), cx.weighted_values(cx.v[:, :, blk.i0:blk.i1], f), f


def global_state(cx):
    """The keys' States: values sum_j phi_k(k_j)^T f_j v_j [B, Hk, r, Gs*Dv] and moments [B, Hk, Gs, M]."""
    state = None
    for blk in cx.blocks(cx.S, chunked=False):
        state = key_states(cx, *_key_features(cx, blk), into=state)
    return state


def global_forward(cx, out, den):
    """Fills out [B, Hk, G, L, Dv] and den [B, Hk, G, L]; returns the value state (the backward reuses it)."""
    state = global_state(cx)
    read_state(cx, state, out, den)
    return state.values


def read_state(cx, state, out, den):
    """Fills out = phi_q S / den and den [B, Hk, G, L] for every query of the call, reading the key States
    ``state`` (no query factor: it cancels in the ratio).  Also the read of an external state (context
    parallelism, kernels/context_parallel.py)."""
    for blk in cx.blocks(cx.L, chunked=False):
        i0, i1 = blk.i0, blk.i1
        qT = cx.queries_t(cx.q5[:, :, :, i0:i1])
        num = apply(cx, cx.phi(qT, "q"), state.values)
        z, _ = read_denominator(cx, qT, state.moments)
        cx.store_normalised(cx.ungrouped(num, blk.C), cx.ungrouped(z.unsqueeze(-1), blk.C).squeeze(-1),
                            out[:, :, :, i0:i1], den[:, :, :, i0:i1])


def global_backward(cx, dq, dk, dv, values):
    """Fills dq, adds to dk and dv; ``values`` is the value state :func:`global_forward` returned (None:
    rebuilt); the moments are rebuilt from the keys (d-space products, cheap)."""
    if values is None:
        state = global_state(cx)
    else:
        moments = None
        for blk in cx.blocks(cx.S, chunked=False):
            moments = key_moments(cx, *_keys(cx, blk), into=moments)
        state = States(values, moments)
    dstate = read_backward(cx, dq, state)
    for blk in cx.blocks(cx.S, chunked=False):
        kT, phk, X, f = _key_features(cx, blk)
        dX, dkT = key_grads(cx, kT, phk, X, f, dstate)
        dk[:, :, blk.i0:blk.i1] += dkT.transpose(-1, -2)
        dv[:, :, blk.i0:blk.i1] += value_grads(cx, dX, f)


def read_backward(cx, dq, state):
    """The backward of :func:`read_state` (after cx.start_backward): fills dq [B, Hk, G, L, D] and returns the
    queries' dstates (values: the cotangent of the value state; moments: the queries' moments weighted by Gd's
    den column, which the keys read back symmetrically)."""
    dstate = None
    for blk in cx.blocks(cx.L, chunked=False):
        i0, i1 = blk.i0, blk.i1
        qT = cx.queries_t(cx.q5[:, :, :, i0:i1])
        z, cache = read_denominator(cx, qT, state.moments)
        den = cx.ungrouped(z.unsqueeze(-1), blk.C).squeeze(-1)
        gd = cx.grouped(cx.grad_augmented(cx.g5[:, :, :, i0:i1], cx.o5[:, :, :, i0:i1], den))
        dqT = query_grads(cx, qT, state, gd, cache)
        dq[:, :, :, i0:i1] = cx.ungrouped(dqT.transpose(-1, -2), blk.C)
        dstate = query_states(cx, qT, cx.phi(qT, "q"), gd, into=dstate)
    return dstate
