"""Reading the low-rank states: the query side (num = phi_q(q) S and its VJP) and the key side
(dX = phi_k(k) dS and dk = J^T (X dS^T)).

A state comes in one of two forms:

* packed (a tensor): the feature-space state, cat layout [B, Hk, r, Gs*E] (see context); read through phi.
* :class:`DSpaceState` (degree 2): the same state in d-space, so that no feature map is built:
  phi_q(q) S = c0 S0 + c1 s q S1 + q'^T M q' (q' = r2 q) with M = unpack(S) [d, d, E], computed as
  T = q' @ M ([C, d, E]) then a contraction; the VJP reuses T (dq' = 2 T gd).

Square states (degree 2, causal, no ALiBi, Gs == 1) are accumulated in d-space directly (no features at all):
M [B, Hk, D, D*E] = sum_j x_j (x) x_j (x) Y_j, S1 [B, Hk, D, E] = sum_j x_j Y_j^T, S0 [B, Hk, E] = sum_j Y_j;
key state: x = k, Y = [f v | f]; query dstate: x = q' = r2 q, Y = Gd.

Which form is read where: the global backward unpacks its two fixed states to d-space once; the global forward
and the causal recurrences on packed states read through phi (unpacking a state that changes every chunk, or
is read once, measured slower on a 2-core CPU); square states are always read in d-space.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .context import accumulate_outer, augment_values, join_groups, split_groups


class DSpaceState(NamedTuple):
    """A degree-2 state in d-space: quadratic [.., d, d*E] (the symmetric d x d matrix of every column,
    flattened), linear [.., d, E], constant [.., E]."""

    quadratic: torch.Tensor
    linear: torch.Tensor
    constant: torch.Tensor


# ---- packed states

def packed_apply(phq, state, Gs):
    """phq [B, Hk, G, C, r] @ state (cat [B, Hk, r, Gs*E]) -> [B, Hk, G, C, E]."""
    B, Hk, G, C, r = phq.shape
    if Gs == 1:
        return (phq.reshape(B, Hk, G * C, r) @ state).reshape(B, Hk, G, C, -1)
    return phq @ split_groups(state, Gs)


def packed_apply_transposed(gd, state, Gs):
    """dphi_q = gd @ state^T: gd [B, Hk, G, C, E], state cat [B, Hk, r, Gs*E] -> [B, Hk, G, C, r]."""
    B, Hk, G, C, E = gd.shape
    if Gs == 1:
        return (gd.reshape(B, Hk, G * C, E) @ state.transpose(-1, -2)).view(B, Hk, G, C, -1)
    return gd @ split_groups(state, Gs).transpose(-1, -2)


def accumulate_query_dstate(cx, dstate, phq, gd):
    """dstate (cat layout) += sum phq^T gd; phq [B, Hk, G, C, r], gd [B, Hk, G, C, E]."""
    B, Hk, G, C, r = phq.shape
    if cx.Gs == 1:
        return accumulate_outer(dstate, phq.reshape(B, Hk, G * C, r), gd.reshape(B, Hk, G * C, -1))
    upd = join_groups(phq.transpose(-1, -2) @ gd)
    return upd if dstate is None else dstate.add_(upd)


# ---- d-space forms

def unpack_key_state(cx, state):
    """The d-space form of a packed key state (unpacking pays off when the state is reused for many chunks)."""
    st = split_groups(state, cx.Gs)  # [B, Hk, Gs, r, E]
    M = cx.fm.unpack(st, 1.0)  # [B, Hk, Gs, d, d, E]
    return DSpaceState(M.flatten(-2), st[..., 1:1 + cx.D, :], st[..., 0, :])


def unpack_query_dstate(cx, dstate):
    """The d-space form of a packed query dstate (for :func:`accumulate_key_grads`)."""
    N = cx.fm.unpack(dstate, 0.5)  # [B, Hk, d, d, E']
    return DSpaceState(N.flatten(-2), dstate[..., 1:1 + cx.D, :], dstate[..., 0, :])


def square_accumulate(cx, st, x, Y):
    """st += the chunk's square state (M, S1, S0); x [B, Hk, C, D], Y [B, Hk, C, E]; None -> a new state."""
    B, Hk, C, D = x.shape
    E = Y.shape[-1]
    Z = torch.mul(x.unsqueeze(-1), Y.unsqueeze(-2), out=cx.buf("sqZ", (B, Hk, C, D, E))).view(B, Hk, C, D * E)
    if st is None:
        return DSpaceState(accumulate_outer(None, x, Z), accumulate_outer(None, x, Y), Y.sum(-2))
    M, S1, S0 = st
    accumulate_outer(M, x, Z)
    accumulate_outer(S1, x, Y)
    S0 += Y.sum(-2)
    return st


def square_key_state_reader(st):
    """A square key state as the query side reads it: [B, Hk, 1, D, D*E], [B, Hk, 1, D, E], [B, Hk, 1, E]."""
    return DSpaceState(*(t.unsqueeze(2) for t in st))


def square_dstate_reader(cx, dst):
    """A square query dstate as the key side reads it (x = q', so the linear part carries c1 s / r2 and the
    constant one c0)."""
    M, S1, S0 = dst
    return DSpaceState(M, S1 * (cx.fm.c1s / cx.fm.r2), S0 * cx.fm.c0)


# ---- query side

def _query_quadratic_product(cx, qc, reader):
    """T = q' @ M: [B, Hk, Gs, G/Gs*C, D, E] (q' = r2 q) in a reused scratch buffer."""
    B, Hk, G, C, D = qc.shape
    M = reader.quadratic
    xs = qc.reshape(B, Hk, cx.Gs, (G // cx.Gs) * C, D) * cx.fm.r2
    return torch.matmul(xs, M, out=cx.buf("T", (*xs.shape[:-1], M.shape[-1]))).unflatten(-1, (D, -1))


def query_numerator(cx, qc, reader):
    """phi_q(qc) S: qc [B, Hk, G, C, D] -> [B, Hk, G, C, E]; reader packed or DSpaceState."""
    if not isinstance(reader, DSpaceState):
        return packed_apply(cx.phi(qc, "q"), reader, cx.Gs)
    B, Hk, G, C, D = qc.shape
    qv = qc.reshape(B, Hk, cx.Gs, (G // cx.Gs) * C, D)
    T = _query_quadratic_product(cx, qc, reader)
    num = (qv.unsqueeze(-2) @ T).squeeze(-2).mul_(cx.fm.r2)  # q'^T M q' = r2 q^T T
    num = num.add_(qv @ reader.linear, alpha=cx.fm.c1s).add_(reader.constant.unsqueeze(-2), alpha=cx.fm.c0)
    return num.view(B, Hk, G, C, -1)


def _packed_denominator(cx, qc, state):
    """Only the den column of phi_q(qc) state (packed): [B, Hk, G, C].  Degree 2 in d-space without building
    phi: c0 p0 + c1 s q.p1 + q'^T unpack(p) q' (p = the den columns of the state, one per Gs)."""
    B, Hk, G, C, D = qc.shape
    E = cx.Dv + 1
    p = state[..., cx.Dv::E]  # [B, Hk, r, Gs]
    if not cx.quad:
        cols = p.unsqueeze(2)
        if cx.Gs > 1:
            cols = cols.transpose(2, -1)
        return (cx.phi(qc, "q") @ cols).squeeze(-1)
    pt = p.transpose(-1, -2)  # [B, Hk, Gs, r]
    Mp = cx.fm.unpack(pt.unsqueeze(-1), 1.0).squeeze(-1)  # [B, Hk, Gs, d, d]
    xs = qc * cx.fm.r2
    z = ((xs @ Mp) * xs).sum(-1)
    z += (qc @ pt[..., 1:1 + D].unsqueeze(-1)).squeeze(-1).mul_(cx.fm.c1s)
    z += pt[..., :1].mul(cx.fm.c0)
    return z


def _dspace_denominator(cx, qc, reader, T):
    """The den column of phi_q(qc) S from T = q' M (reader a DSpaceState): [B, Hk, G, C]."""
    B, Hk, G, C, D = qc.shape
    qv = qc.reshape(B, Hk, cx.Gs, (G // cx.Gs) * C, D)
    Dv = cx.Dv
    z = (qv * T[..., Dv]).sum(-1).mul_(cx.fm.r2)
    z += (qv @ reader.linear[..., Dv:]).squeeze(-1).mul_(cx.fm.c1s)
    z += reader.constant[..., Dv:] * cx.fm.c0
    return z.view(B, Hk, G, C)


def query_denominator(cx, qc, reader, state):
    """(T, den column [B, Hk, G, C]) of a query chunk: T = q' M for :func:`query_grad` and the den read from it
    when ``reader`` is a DSpaceState, else (None, the den from the packed ``state``'s den column)."""
    if not isinstance(reader, DSpaceState):
        return None, _packed_denominator(cx, qc, state)
    T = _query_quadratic_product(cx, qc, reader)
    return T, _dspace_denominator(cx, qc, reader, T)


def query_grad(cx, qc, reader, T, gd):
    """dq [B, Hk, G, C, D] of sum(gd * phi_q(qc) S) (gd [B, Hk, G, C, E]; T from :func:`query_denominator`)."""
    B, Hk, G, C, D = qc.shape
    if not isinstance(reader, DSpaceState):
        return cx.fm.vjp(qc, packed_apply_transposed(gd, reader, cx.Gs), "q")
    gv = gd.reshape(B, Hk, cx.Gs, (G // cx.Gs) * C, -1)
    dq = torch.einsum("...ae,...e->...a", T, gv).mul_(2 * cx.fm.r2)
    dq = dq.add_(gv @ reader.linear.transpose(-1, -2), alpha=cx.fm.c1s)
    return dq.view(B, Hk, G, C, D)


# ---- key side

def _key_grads(cx, kc, reader, X):
    """kc [B, Hk, C, D], X [B, Hk, C, E'] -> dX = phi_k(k) dS [B, Hk, C, E'], dk = J^T (X dS^T)."""
    if not isinstance(reader, DSpaceState):
        phk = cx.phi(kc, "k")
        # Gs == 1: the den column of dX is never used (see accumulate_key_grads), skip it
        dX = phk @ reader[..., :cx.Dv] if cx.Gs == 1 else phk @ reader
        return dX, cx.fm.vjp(kc, X @ reader.transpose(-1, -2), "k")
    N, S1, S0 = reader
    D = kc.shape[-1]
    T = torch.matmul(kc, N, out=cx.buf("T", (*kc.shape[:-1], N.shape[-1]))).unflatten(-1, (D, -1))
    dX = (kc.unsqueeze(-2) @ T).squeeze(-2).add_(kc @ S1).add_(S0.unsqueeze(-2))
    dk = torch.einsum("...ae,...e->...a", T, X).mul_(2.0).add_(X @ S1.transpose(-1, -2))
    return dX, dk


def accumulate_key_grads(cx, dk, dv, reader, j0, j1, f):
    """dk, dv of keys [j0, j1) += their part through the query dstate (dX = phi_k dstate, dphi_k = X dstate^T),
    key factor f [B, Hk, Gs, C] | None."""
    Dv, Gs = cx.Dv, cx.Gs
    kc = cx.k[:, :, j0:j1]
    X = augment_values(cx.v[:, :, j0:j1], f)
    dX, dkc = _key_grads(cx, kc, reader, X)  # dX [B, Hk, C, Gs*(Dv+1)]
    dk[:, :, j0:j1] += dkc
    dXv = dX.unsqueeze(-2) if dX.shape[-1] == Dv else dX.view(*dX.shape[:-1], Gs, Dv + 1)[..., :Dv]  # [B,Hk,C,Gs,Dv]
    if f is not None:
        dXv = dXv * f.permute(0, 1, 3, 2).unsqueeze(-1)
    dv[:, :, j0:j1] += dXv.sum(-2)
