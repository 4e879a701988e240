"""The global regime (non-causal, no window): one state for all queries.

Saug = phi_k(K)^T [f V | f] ([B, Hk, r, Gs*(Dv+1)], f = the key factor), out = phi_q(Q) Saug[:, :Dv] /
phi_q(Q) Saug[:, Dv].  Backward: dq through the state in d-space (degree 2) or phi's VJP, then
dSaug = sum phi_q^T Gd and the key side through it.
"""
from __future__ import annotations

from .context import accumulate_outer, augment_values
from .states import (accumulate_key_grads, accumulate_query_dstate, packed_apply, query_denominator, query_grad,
                     unpack_key_state, unpack_query_dstate)


def global_state(cx):
    """Saug = sum_j phi_k(k_j)^T [f_j v_j | f_j]: [B, Hk, r, Gs*(Dv+1)]."""
    state = None
    for j0, j1 in cx.spans(cx.S):
        phk = cx.phi(cx.k[:, :, j0:j1], "k")
        X = augment_values(cx.v[:, :, j0:j1], cx.global_key_factor(j0, j1))
        state = accumulate_outer(state, phk, X)
    return state


def global_forward(cx, out, den):
    """Fills out [B, Hk, G, L, Dv] and den [B, Hk, G, L]; returns the state (the backward may reuse it)."""
    state = global_state(cx)
    for i0, i1 in cx.spans(cx.L):
        cx.store_normalised(packed_apply(cx.phi(cx.q5[:, :, :, i0:i1], "q"), state, cx.Gs), out, den, i0, i1)
    return state


def global_backward(cx, dq, dk, dv, state):
    """Fills dq, adds to dk and dv; ``state`` from :func:`global_forward` (None: rebuilt)."""
    if state is None:
        state = global_state(cx)
    reader = unpack_key_state(cx, state) if cx.quad else state
    # two passes over the queries: dq (d-space, its [C, d, Dv+1] scratch is larger than L2), then
    # dstate = sum phi_q^T Gd (features + one accumulating matmul); interleaved, each evicted the
    # other's working set (measured 1.25x slower at n = 32k)
    gds = cx.q5.new_empty(cx.B, cx.Hk, cx.G, cx.L, cx.Dv + 1)
    for i0, i1 in cx.spans(cx.L):
        qc = cx.q5[:, :, :, i0:i1]
        T, z = query_denominator(cx, qc, reader, state)
        gd = cx.grad_augmented(i0, i1, z)
        dq[:, :, :, i0:i1] = query_grad(cx, qc, reader, T, gd)
        gds[:, :, :, i0:i1] = gd
    dstate = None
    for i0, i1 in cx.spans(cx.L):
        dstate = accumulate_query_dstate(cx, dstate, cx.phi(cx.q5[:, :, :, i0:i1], "q"), gds[:, :, :, i0:i1])
    key_reader = unpack_query_dstate(cx, dstate) if cx.quad else dstate
    for j0, j1 in cx.spans(cx.S):
        accumulate_key_grads(cx, dk, dv, key_reader, j0, j1, cx.global_key_factor(j0, j1))
