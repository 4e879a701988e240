"""The causal regime (no window): chunks of ``chunk`` tokens.

Inside a chunk P(scale q.k) directly with a tril mask (direct.py); across chunks a running state of the keys
before the chunk, decayed by exp(-a chunk) per chunk with ALiBi (a = max(m, 0); key factor
exp(a (j - c1) + (m - a) j), query factor exp(-a (i - i0))).  Degree 2 without ALiBi keeps the running states
in the square d-space layout (states.square_accumulate), updated and consumed by plain matmuls, no features.
The backward recomputes the prefix states in forward order (dq, Gd) and then sums phi_q^T Gd as suffix states in
reverse order (dk, dv).
"""
from __future__ import annotations

import torch

from .context import accumulate_outer, augment_values
from .direct import block_backward, block_numerator, direct_block
from .states import (accumulate_key_grads, accumulate_query_dstate, query_denominator, query_grad,
                     query_numerator, square_accumulate, square_dstate_reader, square_key_state_reader)


def _decay(cx, state, c):
    """state (cat layout) *= exp(-a c) in place, per query head (ALiBi only)."""
    if cx.alibi is None:
        return
    g = torch.exp(-cx.a * c)  # [Hk, G]
    state.mul_(g.unsqueeze(-1).expand(cx.Hk, cx.G, cx.Dv + 1).reshape(1, cx.Hk, 1, -1))


def _add_keys(cx, state, j0, j1):
    """The running key state with keys j0..j1 added (None: a new one)."""
    X = augment_values(cx.v[:, :, j0:j1], cx.causal_key_factor(j0, j1, j1))
    if cx.square:
        return square_accumulate(cx, state, cx.k[:, :, j0:j1], X)
    phk = cx.phi(cx.k[:, :, j0:j1], "k")
    if state is not None:
        _decay(cx, state, j1 - j0)
    return accumulate_outer(state, phk, X)


def _add_queries(cx, dstate, i0, i1, gd):
    """The suffix query dstate with queries i0..i1 (Gd [B, Hk, G, C, Dv+1]) added (None: a new one)."""
    qc = cx.q5[:, :, :, i0:i1]
    if dstate is not None:
        _decay(cx, dstate, cx.chunk)
    if cx.square:  # no ALiBi: no query factor
        C = cx.G * (i1 - i0)
        return square_accumulate(cx, dstate, (qc * cx.fm.r2).reshape(cx.B, cx.Hk, C, cx.D),
                                 gd.reshape(cx.B, cx.Hk, C, cx.Dv + 1))
    qf = cx.causal_query_factor(i0, i1)
    return accumulate_query_dstate(cx, dstate, cx.phi(qc, "q"), gd if qf is None else gd * qf)


def _key_state_reader(cx, state):
    return square_key_state_reader(state) if cx.square else state


def causal_forward(cx, out, den):
    """Fills out [B, Hk, G, L, Dv] and den [B, Hk, G, L]."""
    running = None
    for i0, i1 in cx.spans(cx.L):
        qc, _, va, _, _, W = direct_block(cx, i0, i1, i0, i1)
        num = block_numerator(W, va)
        if running is not None:
            inter = query_numerator(cx, qc, _key_state_reader(cx, running))
            qf = cx.causal_query_factor(i0, i1)
            num = num + (inter if qf is None else inter * qf)
        cx.store_normalised(num, out, den, i0, i1)
        if i1 < cx.L:
            running = _add_keys(cx, running, i0, i1)


def causal_backward(cx, dq, dk, dv):
    """Fills dq [B, Hk, G, L, D], adds to dk and dv."""
    gds = _backward_forward_order(cx, dq, dk, dv)
    _backward_reverse_order(cx, dk, dv, gds)


def _backward_forward_order(cx, dq, dk, dv):
    """Pass A, chunks in forward order with the prefix state recomputed: dq, the diagonal blocks' dk and dv;
    returns Gd [B, Hk, G, L, Dv+1]."""
    gds = cx.q5.new_empty(cx.B, cx.Hk, cx.G, cx.L, cx.Dv + 1)
    state = None
    for i0, i1 in cx.spans(cx.L):
        qc, kc, va, M, s, W = direct_block(cx, i0, i1, i0, i1)
        den_c = W.sum(-1)
        qf = cx.causal_query_factor(i0, i1)
        if state is not None:
            reader = _key_state_reader(cx, state)
            T, z = query_denominator(cx, qc, reader, state)
            den_c = den_c + (z if qf is None else z * qf.squeeze(-1))
        gd = cx.grad_augmented(i0, i1, den_c)
        gds[:, :, :, i0:i1] = gd
        a, b, c = block_backward(cx, qc, kc, va, M, gd, s, W)
        if state is not None:
            a = a + query_grad(cx, qc, reader, T, gd if qf is None else gd * qf)
        dq[:, :, :, i0:i1] = a
        dk[:, :, i0:i1] += b
        dv[:, :, i0:i1] += c
        if i1 < cx.L:
            state = _add_keys(cx, state, i0, i1)
    return gds


def _backward_reverse_order(cx, dk, dv, gds):
    """Pass B, chunks in reverse order: the keys' gradients through the suffix sums of phi_q^T Gd."""
    dstate = None
    spans = list(cx.spans(cx.L))
    for ci in range(len(spans) - 1, -1, -1):
        i0, i1 = spans[ci]
        if dstate is not None:
            reader = square_dstate_reader(cx, dstate) if cx.square else dstate
            accumulate_key_grads(cx, dk, dv, reader, i0, i1, cx.causal_key_factor(i0, i1, i1))
        if ci > 0:
            dstate = _add_queries(cx, dstate, i0, i1, gds[:, :, :, i0:i1])
