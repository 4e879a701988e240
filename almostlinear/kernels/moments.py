"""The denominator's state in compact form: weighted moments of the keys (or of the queries).

The op's denominator den_i = sum_j w_j P(scale q_i . k_j) needs no value column.  For degree 2

    sum_j w_j P(s q . k_j) = c0 M0 + c1 s q . M1 + c2 s^2 q^T M2 q,   M0 = sum w, M1 = sum w k, M2 = sum w k k^T

so the state is 1 + d + d^2 numbers, built by a [D, R] x [R, D] product and read by a [D, D] x [D, R] one: no
pass over the [r, R] features, and the value state's products keep N = Dv columns (at Dv = 64 a 65th column
costs ~15-30% of a [r, R] x [R, Dv] product, measured).  P(s x . y) is symmetric in x and y, so one set of
functions serves both sides: the key moments (weights f, the key factor) read by the queries give den and
its share of dq; the query moments (weights Gd's den column) read by the keys give the den share of dk.

Layouts: x feature-major [..., Gx, D, R] (Gx = 1: the same columns for every group), weights w [..., Gs, R]
(None: all ones, Gs = Gx), moments [..., Gs, M].  Other degrees (:class:`FeatureMoments`) keep the moments in
feature space: sum_j w_j phi_k(k_j), [..., Gs, r].
"""
from __future__ import annotations

import torch

from .features import Quad2Features, fast_rank


def moment_size(d: int, degree: int) -> int:
    """M, the length of one group's moments (arithmetic only: fake kernels call it)."""
    return 1 + d + d * d if degree == 2 else fast_rank(d, degree)


def moments_for(fm):
    """The moment functions matching a feature map (:class:`Quad2Moments` for degree 2)."""
    return Quad2Moments(fm) if isinstance(fm, Quad2Features) else FeatureMoments(fm)


def _sum_groups_like(g, xT):
    """Sum g [..., Gs, D, R] over its groups where xT [..., 1, D, R] is shared by them."""
    return g.sum(-3, keepdim=True) if xT.shape[-3] == 1 and g.shape[-3] > 1 else g


class Quad2Moments:
    """Degree 2: moments [..., Gs, 1 + D + D*D] = [M0 | M1 | M2 (row-major)]."""

    def __init__(self, fm: Quad2Features):
        self.d = fm.d
        self.size = moment_size(fm.d, 2)
        self.c0, self.c1s, self.c2s2 = fm.c0, fm.c1s, fm.r2 * fm.r2

    def accumulate(self, xT, w=None):
        """sum over the R columns of w * [1 | x | x x^T]: xT [..., Gx, D, R], w [..., Gs, R] | None ->
        [..., Gs, M]."""
        if w is None:
            m0 = torch.full_like(xT[..., 0, :1], xT.shape[-1])
            m1 = xT.sum(-1)
            xw = xT
        else:
            m0 = w.sum(-1, keepdim=True)
            m1 = (xT @ w.unsqueeze(-1)).squeeze(-1)
            xw = xT * w.unsqueeze(-2)
        m2 = xw @ xT.transpose(-1, -2)
        return torch.cat([m0, m1, m2.flatten(-2)], -1)

    def _split(self, m):
        d = self.d
        return m[..., 0], m[..., 1:1 + d], m[..., 1 + d:].unflatten(-1, (d, d))

    def read(self, xT, m):
        """(sum_j w_j P(s x . k_j) [..., Gs, R] for each column x of xT [..., Gx, D, R], the cache :meth:`vjp`
        reuses)."""
        m0, m1, m2 = self._split(m)
        y = m2 @ xT  # [..., Gs, D, R]
        val = (m1.unsqueeze(-2) @ xT).squeeze(-2).mul_(self.c1s)
        val.add_((xT * y).sum(-2), alpha=self.c2s2).add_(m0.unsqueeze(-1), alpha=self.c0)
        return val, y

    def vjp(self, xT, m, w=None, cache=None):
        """d/dx of sum_groups w * read(x): [..., Gx, D, R] (w [..., Gs, R] | None; cache from :meth:`read`)."""
        _, m1, m2 = self._split(m)
        y = m2 @ xT if cache is None else cache
        g = torch.mul(y, 2.0 * self.c2s2).add_(m1.unsqueeze(-1), alpha=self.c1s)
        if w is not None:
            g.mul_(w.unsqueeze(-2))
        return _sum_groups_like(g, xT)


class FeatureMoments:
    """Any other feature map (degree >= 4, small d): the moments are sum_j w_j phi_k(x_j), [..., Gs, r]."""

    def __init__(self, fm):
        self.fm, self.size = fm, fm.rank

    def accumulate(self, xT, w=None):
        ph = self.fm.phi_t(xT, "k")  # [..., Gx, r, R]
        return ph.sum(-1) if w is None else (ph @ w.unsqueeze(-1)).squeeze(-1)

    def read(self, xT, m):
        return (m.unsqueeze(-2) @ self.fm.phi_t(xT, "q")).squeeze(-2), None

    def vjp(self, xT, m, w=None, cache=None):
        R = xT.shape[-1]
        dphi = m.unsqueeze(-1).expand(*m.shape, R) if w is None else m.unsqueeze(-1) * w.unsqueeze(-2)
        lead = torch.broadcast_shapes(xT.shape[:-2], dphi.shape[:-2])
        g = self.fm.vjp_t(xT.expand(*lead, *xT.shape[-2:]), dphi.expand(*lead, *dphi.shape[-2:]), "q")
        return _sum_groups_like(g, xT)
