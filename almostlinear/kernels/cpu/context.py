"""Shared per-call setup of the CPU path: shapes, the feature map, scratch buffers, chunking, and the factors
each weight W_ij = P(s_ij) * key_weight_j * exp(m_h (j - i)) * valid_ij is split into.

Layouts: queries are viewed as q5 [B, Hk, G, L, D] (G = Hq // Hk query heads per key head; K/V are never
repeated).  A state in the "cat layout" [B, Hk, r, Gs*E] holds Gs column blocks of width E side by side: Gs = G
with ALiBi (the key factor differs per query head), else 1.
"""
from __future__ import annotations

import torch

from ..features import Quad2Features, fast_feature_map
from ..key_mask import allowed_key_block

TINY = 1e-30


def feature_map_for(q, scale, coeffs):
    """The (cached) feature map of P with these coefficients and scale, for q's head dim, device and dtype."""
    return fast_feature_map(q.shape[-1], len(coeffs) - 1, tuple(coeffs), float(scale), str(q.device), q.dtype)


def safe_reciprocal(den):
    """1 / den where den > 0, else 0 (a row whose weights are all zero gives 0)."""
    return torch.where(den > TINY, 1.0 / den.clamp_min(TINY), torch.zeros_like(den))


def augment_values(v, f):
    """X = [f v | f] per group: v [B, Hk, C, Dv], f [B, Hk, Gs, C] | None -> [B, Hk, C, Gs*(Dv+1)] (cat layout;
    f None: [v | 1])."""
    ones = torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    va = torch.cat([v, ones], -1)  # [B, Hk, C, Dv+1]
    if f is None:
        return va
    B, Hk, Gs, C = f.shape
    x = f.unsqueeze(-1) * va.unsqueeze(2)  # [B, Hk, Gs, C, Dv+1]
    return x.permute(0, 1, 3, 2, 4).reshape(B, Hk, C, Gs * va.shape[-1])


def split_groups(state, Gs):
    """cat layout [B, Hk, r, Gs*E] -> [B, Hk, Gs, r, E]."""
    B, Hk, r, GE = state.shape
    return state.reshape(B, Hk, r, Gs, GE // Gs).permute(0, 1, 3, 2, 4)


def join_groups(st):
    """[B, Hk, Gs, r, E] -> cat layout [B, Hk, r, Gs*E]."""
    B, Hk, Gs, r, E = st.shape
    return st.permute(0, 1, 3, 2, 4).reshape(B, Hk, r, Gs * E)


def accumulate_outer(state, a, b):
    """state += a^T b over the last two dims (in place; None: allocated and returned)."""
    if state is None:
        return a.transpose(-1, -2) @ b
    r, e = state.shape[-2:]
    state.view(-1, r, e).baddbmm_(a.reshape(-1, *a.shape[-2:]).transpose(-1, -2), b.reshape(-1, *b.shape[-2:]))
    return state


class CallContext:
    """One forward or backward call: shapes, the feature map, reused scratch buffers and the weight factors.

    q [B, Hq, L, D], k [B, Hk, S, D], v [B, Hk, S, Dv], key_weight [B, S] | None, alibi [Hq] | None.
    ``square_states``: degree 2, causal, no window, no ALiBi: keep the running states in the square d-space
    layout (see states.square_accumulate; faster) instead of the packed feature layout that ALiBi and higher
    degrees use.
    """

    def __init__(self, q, k, v, key_weight, alibi, scale, coeffs, causal, window, chunk, square_states=True):
        self.B, self.Hq, self.L, self.D = q.shape
        self.Hk, self.S, self.Dv = k.shape[1], k.shape[2], v.shape[-1]
        self.G = self.Hq // self.Hk
        self.Gs = self.G if alibi is not None else 1
        self.q5 = q.view(self.B, self.Hk, self.G, self.L, self.D)
        self.k, self.v, self.kw, self.alibi = k, v, key_weight, alibi
        self.scale, self.coeffs, self.causal, self.window = scale, tuple(coeffs), causal, window
        self.chunk = chunk
        self.fm = feature_map_for(q, scale, coeffs)
        self.quad = isinstance(self.fm, Quad2Features)  # degree 2: states can be consumed in d-space
        self.square = square_states and self.quad and causal and not window and alibi is None
        self.dt, self.dev = q.dtype, q.device
        self._bufs = {}
        if alibi is not None:
            self.m = alibi.to(self.dt).view(self.Hk, self.G)  # [Hk, G]
            self.a = self.m.clamp_min(0.0)

    def spans(self, n):
        """(start, stop) of the chunks of [0, n)."""
        for i0 in range(0, n, self.chunk):
            yield i0, min(n, i0 + self.chunk)

    def buf(self, name, shape):
        """A contiguous scratch tensor reused across chunks (fresh multi-MB allocations page-fault)."""
        n = 1
        for x in shape:
            n *= x
        b = self._bufs.get(name)
        if b is None or b.numel() < n:
            b = self._bufs[name] = torch.empty(n, dtype=self.dt, device=self.dev)
        return b[:n].view(shape)

    def phi(self, x, side):
        """Features of x [..., D] -> [..., r] (side "q" or "k") in a reused scratch buffer."""
        return self.fm.phi(x, side, out=self.buf("phi" + side, (*x.shape[:-1], self.fm.rank)))

    def positions(self, lo, hi):
        return torch.arange(lo, hi, device=self.dev, dtype=self.dt)

    def key_weights(self, j0, j1):
        """[B, C] key weights of keys j0..j1 in the compute dtype, or None."""
        return None if self.kw is None else self.kw[:, j0:j1].to(self.dt)

    def start_backward(self, grad, out):
        """Keep grad and out [B, Hq, L, Dv] as [B, Hk, G, L, Dv] for :meth:`grad_augmented`."""
        self.g5 = grad.view(self.B, self.Hk, self.G, self.L, self.Dv)
        self.o5 = out.view(self.B, self.Hk, self.G, self.L, self.Dv)

    def grad_augmented(self, i0, i1, den):
        """Gd = [G / den | -Delta / den] of queries i0..i1 (Delta = G . out): [B, Hk, G, C, Dv+1]."""
        grad_c, out_c = self.g5[:, :, :, i0:i1], self.o5[:, :, :, i0:i1]
        inv = safe_reciprocal(den).unsqueeze(-1)
        delta = (grad_c * out_c).sum(-1, keepdim=True)
        return torch.cat([grad_c * inv, -delta * inv], -1)

    def store_normalised(self, num, out, den_out, i0, i1):
        """out = num[:Dv] / den and den_out = den (num's last column) for queries i0..i1."""
        den = num[..., self.Dv]
        out[:, :, :, i0:i1] = num[..., :self.Dv] * safe_reciprocal(den).unsqueeze(-1)
        den_out[:, :, :, i0:i1] = den

    # ---- key factors (the part of the weight that depends on j only) [B, Hk, Gs, C] | None
    def global_key_factor(self, j0, j1):
        """exp(m (j - j*)) * key_weight_j with j* the argmax of m j (exponents <= 0)."""
        f = None
        if self.alibi is not None:
            jstar = torch.where(self.m > 0, float(self.S - 1), 0.0)
            f = torch.exp(self.m.unsqueeze(-1) * (self.positions(j0, j1) - jstar.unsqueeze(-1)))  # [Hk, G, C]
            f = f.unsqueeze(0)
        return self._with_key_weight(f, j0, j1)

    def causal_key_factor(self, j0, j1, c1):
        """exp(a (j - c1) + (m - a) j) * key_weight_j (a = max(m, 0)): the decayed state's key part."""
        f = None
        if self.alibi is not None:
            j = self.positions(j0, j1)
            f = torch.exp(self.a.unsqueeze(-1) * (j - c1) + (self.m - self.a).unsqueeze(-1) * j).unsqueeze(0)
        return self._with_key_weight(f, j0, j1)

    def _with_key_weight(self, f, j0, j1):
        """Multiply a key factor (or None) by the key weights of keys j0..j1; [B, Hk, Gs, C] | None."""
        kw = self.key_weights(j0, j1)
        if kw is not None:
            kw = kw[:, None, None, :]
            f = kw if f is None else f * kw
        if f is not None:
            f = f.expand(self.B, self.Hk, self.Gs, j1 - j0)
        return f

    def causal_query_factor(self, i0, i1):
        """[1, Hk, G, C, 1] | None: exp(-a (i - i0)), the query part of the causal ALiBi factor."""
        if self.alibi is None:
            return None
        return torch.exp(-self.a.unsqueeze(-1) * (self.positions(i0, i1) - i0)).unsqueeze(0).unsqueeze(-1)

    # ---- a block of queries i0..i1 against keys j0..j1, weighted directly (causal diagonal blocks, bands)
    def block_multiplier(self, i0, i1, j0, j1):
        """M [B|1, Hk|1, G|1, Ci, Cj] = valid * ALiBi factor * key weight of a directly weighted block."""
        i = torch.arange(i0, i1, device=self.dev).unsqueeze(-1)
        j = torch.arange(j0, j1, device=self.dev).unsqueeze(0)
        M = allowed_key_block(i, j, self.causal, self.window).to(self.dt)
        if self.alibi is not None:
            lf = self._alibi_log_factor(i, j).masked_fill(M == 0, float("-inf"))
            M = torch.exp(lf).unsqueeze(0) * M
        kw = self.key_weights(j0, j1)
        if kw is not None:
            M = M * kw[:, None, None, None, :]
        return M

    def _alibi_log_factor(self, i, j):
        """[Hk, G, Ci, Cj] log of the ALiBi factor: causal regime exp(a (j - i) + (m - a) j), consistent with
        the decayed state; banded m (j - i) minus the row maximum over the valid range."""
        m = self.m[..., None, None]  # [Hk, G, 1, 1]
        rel = (j - i).to(self.dt)
        if not self.window:
            a = self.a[..., None, None]
            return a * rel + (m - a) * j.to(self.dt)
        ii = i.to(self.dt)
        lo = (ii - self.window + 1).clamp_min(0)
        hi = ii if self.causal else (ii + self.window - 1).clamp_max(self.S - 1)
        off = torch.maximum(m * (lo - ii), m * (hi - ii))
        return m * rel - off

    def band(self, i0, i1):
        """The keys [j0, j1) that queries i0..i1 can see in the banded regime."""
        if self.causal:
            return max(0, i0 - self.window + 1), i1
        return max(0, i0 - self.window + 1), min(self.S, i1 + self.window - 1)
