"""The low-rank states and how they are read: every product is a plain matmul, on features built feature-major
([..., r, R] for R tokens; for degree 2 in the block-symmetric layout of features.Quad2Features).

A key state is S = sum_j phi_k(k_j)^T X_j with X = [f v | f] (f = key factor), a query dstate is
dS = sum_i phi_q(q_i)^T Gd_i; both in the cat layout [..., r, Gs*E] (E = Dv + 1, see context).  The leading dims
"..." are [B, Hk] for the global regime and [g, B, Hk] (one state per chunk) for causal blocks.  Query rows come
grouped as [..., Gs, R, .] (CallContext.grouped: R = G / Gs query heads x C tokens), their features as
[..., Gs, r, R]; keys as [..., C, .], their features [..., r, C].  Query side: num = phi_q S, dphi_q = Gd S^T;
key side: dX = phi_k dS, dphi_k = X dS^T; the feature map's VJP turns dphi into dq / dk.
"""
from __future__ import annotations

import torch


def _per_group(cx, state):
    """Cat layout [..., r, Gs*E] -> [..., Gs, r, E] (a view)."""
    return state.unflatten(-1, (cx.Gs, -1)).transpose(-3, -2)


def accumulate_product(state, a, b):
    """state += a @ b over the last two dims (in place; None: allocated and returned)."""
    if state is None:
        return a @ b
    r, e = state.shape[-2:]
    state.view(-1, r, e).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return state


def query_state(cx, phq, gd, into=None):
    """phi_q^T Gd summed over the rows of each group: phq [..., Gs, r, R], gd [..., Gs, R, E] -> [..., r, Gs*E],
    added to ``into`` in place when given."""
    if cx.Gs == 1:
        return accumulate_product(into, phq.squeeze(-3), gd.squeeze(-3))
    upd = (phq @ gd).transpose(-3, -2).flatten(-2)
    return upd if into is None else into.add_(upd)


def apply(cx, phq, state):
    """phi_q S: phq [..., Gs, r, R], state [..., r, Gs*E] -> [..., Gs, R, E]."""
    return phq.transpose(-1, -2) @ _per_group(cx, state)


def apply_transposed(cx, gd, state):
    """dphi_q = Gd S^T, feature-major: gd [..., Gs, R, E], state [..., r, Gs*E] -> [..., Gs, r, R] (scratch)."""
    sg = _per_group(cx, state)
    out = cx.buf("dphi", (*gd.shape[:-2], sg.shape[-2], gd.shape[-2]))
    return torch.matmul(sg, gd.transpose(-1, -2), out=out)


def apply_denominator(cx, phq, state):
    """The den column of phi_q S alone (matrix-vector products): [..., Gs, R]."""
    cols = _per_group(cx, state)[..., cx.Dv]  # [..., Gs, r]
    return (cols.unsqueeze(-2) @ phq).squeeze(-2)


def key_grads(cx, kT, phk, X, dstate):
    """dX = phi_k dS [..., C, Gs*E] (Gs == 1: [..., C, Dv], the den column is never used) and
    dk^T = J^T (X dS^T) [..., D, C] of keys kT [..., D, C] with features phk [..., r, C]."""
    dX = phk.transpose(-1, -2) @ (dstate[..., :cx.Dv] if cx.Gs == 1 else dstate)
    dphi = torch.matmul(dstate, X.transpose(-1, -2), out=cx.buf("dphi", phk.shape))
    return dX, cx.vjp(kT, dphi, "k")


def value_grads(cx, dX, f):
    """dv [..., C, Dv] from dX (see :func:`key_grads`) and the key factor f [..., Gs, C] | None."""
    Dv, Gs = cx.Dv, cx.Gs
    if dX.shape[-1] == Dv and f is None:
        return dX
    dXv = dX.unsqueeze(-2) if dX.shape[-1] == Dv else dX.unflatten(-1, (Gs, Dv + 1))[..., :Dv]  # [..., C, Gs, Dv]
    if f is not None:
        dXv = dXv * f.transpose(-1, -2).unsqueeze(-1)
    return dXv.sum(-2)
