"""The low-rank states and how they are read: every feature-space product is a plain matmul with Dv columns, on
features built feature-major ([..., r, R] for R tokens; for degree 2 in the block-symmetric layout of
features.Quad2Features).  The denominator's share lives apart, in moments (kernels/moments.py).

A key state is :class:`States` (values S = sum_j phi_k(k_j)^T (f_j v_j), moments of the keys weighted f, f =
key factor); a query dstate is the same pair for dS = sum_i phi_q(q_i)^T Gv_i and the queries' moments weighted
gden, where Gd = [Gv | gden] = [G / den | -Delta / den] (CallContext.grad_augmented).  Values are in the cat
layout [..., r, Gs*Dv] (see context), moments [..., Gs, M].  The leading dims "..." are [B, Hk] for the global
regime and [g, B, Hk] (one state per chunk) for causal blocks.  Query rows come grouped as [..., Gs, R, .]
(CallContext.grouped: R = G / Gs query heads x C tokens), their features as [..., Gs, r, R]; keys as
[..., C, .], their features [..., r, C].  Query side: num = phi_q S, dphi_q = Gv S^T; key side: dX = phi_k dS,
dphi_k = X dS^T; the feature map's VJP turns dphi into dq / dk.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class States(NamedTuple):
    """values [..., r, Gs*Dv] and moments [..., Gs, M] (see the module docstring)."""

    values: torch.Tensor
    moments: torch.Tensor


def _per_group(cx, values):
    """Cat layout [..., r, Gs*Dv] -> [..., Gs, r, Dv] (a view)."""
    return values.unflatten(-1, (cx.Gs, -1)).transpose(-3, -2)


def accumulate_product(state, a, b, out=None):
    """state += a @ b over the last two dims (in place; None: a @ b, into ``out`` when given)."""
    if state is None:
        return a @ b if out is None else torch.matmul(a, b, out=out)
    r, e = state.shape[-2:]
    state.view(-1, r, e).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return state


def _added(into, t):
    return t if into is None else into.add_(t)


def _scratch_values(cx, scratch, a, b):
    """The scratch buffer for a fresh values product a @ b when ``scratch`` (a block's chunk states, used up within
    the block: a fresh 8.8 MB product output made the [16, 2145, 128] x [16, 128, 64] product 60% slower), else
    None."""
    return cx.buf("chunk_values", (*a.shape[:-1], b.shape[-1])) if scratch else None


def key_states(cx, kT, phk, X, f, into=None, scratch=False):
    """The keys' States: kT [..., D, C], features phk [..., r, C], X = f v [..., C, Gs*Dv] (weighted_values),
    f [..., Gs, C] | None; added to ``into`` in place when given, else new (values in scratch with ``scratch``)."""
    out = _scratch_values(cx, scratch and into is None, phk, X)
    values = accumulate_product(None if into is None else into.values, phk, X, out)
    return States(values, _added(None if into is None else into.moments, cx.mom.accumulate(kT.unsqueeze(-3), f)))


def key_moments(cx, kT, f, into=None):
    """The keys' moments alone (the backward's den when the forward's value state is reused)."""
    return _added(into, cx.mom.accumulate(kT.unsqueeze(-3), f))


def query_states(cx, qT, phq, gd, into=None, scratch=False):
    """The queries' dstates: qT [..., Gs, D, R], features phq [..., Gs, r, R], gd [..., Gs, R, Dv+1] (``into``,
    ``scratch``: as for :func:`key_states`)."""
    gv = gd[..., :cx.Dv]
    if cx.Gs == 1:
        a, b = phq.squeeze(-3), gv.squeeze(-3)
        out = _scratch_values(cx, scratch and into is None, a, b)
        values = accumulate_product(None if into is None else into.values, a, b, out)
    else:
        values = _added(None if into is None else into.values, (phq @ gv).transpose(-3, -2).flatten(-2))
    return States(values, _added(None if into is None else into.moments, cx.mom.accumulate(qT, gd[..., cx.Dv])))


def apply(cx, phq, values):
    """phi_q S: phq [..., Gs, r, R], values [..., r, Gs*Dv] -> [..., Gs, R, Dv]."""
    return phq.transpose(-1, -2) @ _per_group(cx, values)


def read_denominator(cx, qT, moments):
    """(den [..., Gs, R] of the queries qT [..., Gs, D, R] against the keys' moments, the cache query_grads
    reuses)."""
    return cx.mom.read(qT, moments)


def query_grads(cx, qT, states, gd, cache):
    """dq^T [..., Gs, D, R] of the queries qT against the key states, from Gd [..., Gs, R, Dv+1] (already times
    any query factor) and the cache of :func:`read_denominator`: the VJP of dphi_q = Gv S^T plus the moments'
    share through gden.  The result is the call's scratch buffer (CallContext.vjp): use it before the next call."""
    sg = _per_group(cx, states.values)
    gv = gd[..., :cx.Dv]
    dphi = torch.matmul(sg, gv.transpose(-1, -2), out=cx.buf("dphi", (*gv.shape[:-2], sg.shape[-2], gv.shape[-2])))
    return cx.vjp(qT, dphi, "q").add_(cx.mom.vjp(qT, states.moments, gd[..., cx.Dv], cache))


def key_grads(cx, kT, phk, X, f, dstates):
    """dX = phi_k dS [..., C, Gs*Dv] and dk^T [..., D, C] of keys kT [..., D, C] (features phk [..., r, C],
    X = f v, key factor f) against the query dstates.  dk^T is the call's scratch buffer, as in :func:`query_grads`."""
    dX = phk.transpose(-1, -2) @ dstates.values
    dphi = torch.matmul(dstates.values, X.transpose(-1, -2), out=cx.buf("dphi", phk.shape))
    dkT = cx.vjp(kT, dphi, "k").add_(cx.mom.vjp(kT.unsqueeze(-3), dstates.moments, f).squeeze(-3))
    return dX, dkT


def value_grads(cx, dX, f):
    """dv [..., C, Dv] from dX [..., C, Gs*Dv] (see :func:`key_grads`) and the key factor f [..., Gs, C] | None."""
    if f is None:
        return dX if cx.Gs == 1 else dX.unflatten(-1, (cx.Gs, cx.Dv)).sum(-2)
    return (dX.unflatten(-1, (cx.Gs, cx.Dv)) * f.transpose(-1, -2).unsqueeze(-1)).sum(-2)
