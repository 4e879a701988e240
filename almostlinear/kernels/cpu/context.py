"""Shared per-call setup of the CPU path: shapes, the feature map, scratch buffers, blocking, and the factors
each weight W_ij = P(s_ij) * key_weight_j * exp(m_h (j - i)) * valid_ij is split into.

Layouts: queries are viewed as q5 [B, Hk, G, L, D] (G = Hq // Hk query heads per key head; K/V are never
repeated).  A value state in the "cat layout" [..., r, Gs*Dv] holds Gs column blocks of width Dv side by side:
Gs = G with ALiBi (the key factor differs per query head), else 1; its moments are [..., Gs, M] (states.py).

Blocks: the regimes walk the sequence in blocks of about BLOCK_ROWS rows (B * Hq * tokens), so that every op
is large enough to keep all intra-op threads busy and the Python loop stays short.  A causal block is g chunks
of ``chunk`` tokens, held chunk-first: queries [g, B, Hk, G, C, D], keys [g, B, Hk, C, D] (see
:meth:`CallContext.rows`); a global block is one run of tokens.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..features import active_fake_mode, fast_feature_map
from ..key_mask import allowed_key_block
from ..moments import moments_for

TINY = 1e-30
BLOCK_ROWS = 2048  # rows (B * Hq * tokens) per block: 1024-4096 within ~5% at n = 32k, d = 64 (1 thread, causal)


def feature_map_for(q, scale, coeffs):
    """The (cached) feature map of P with these coefficients and scale, for q's head dim, device and dtype."""
    return fast_feature_map(q.shape[-1], len(coeffs) - 1, tuple(coeffs), float(scale), str(q.device), q.dtype)


def _is_fake(t):
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


def safe_reciprocal(den):
    """1 / den where den > 0, else 0 (a row whose weights are all zero gives 0)."""
    return torch.where(den > TINY, 1.0 / den.clamp_min(TINY), torch.zeros_like(den))


def augment_values(v):
    """[v | 1]: v [..., C, Dv] -> [..., C, Dv+1] (a directly weighted block's numerator and denominator at once)."""
    return torch.cat([v, torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)], -1)


class Block(NamedTuple):
    """Tokens [i0, i1) as g chunks of C tokens each."""

    i0: int
    i1: int
    g: int
    C: int


class CallContext:
    """One forward or backward call: shapes, the feature map, reused scratch buffers and the weight factors.

    q [B, Hq, L, D], k [B, Hk, S, D], v [B, Hk, S, Dv], key_weight [B, S] | None, alibi [Hq] | None.
    """

    def __init__(self, q, k, v, key_weight, alibi, scale, coeffs, causal, window, chunk):
        self.B, self.Hq, self.L, self.D = q.shape
        self.Hk, self.S, self.Dv = k.shape[1], k.shape[2], v.shape[-1]
        self.G = self.Hq // self.Hk
        self.Gs = self.G if alibi is not None else 1
        self.q5 = q.view(self.B, self.Hk, self.G, self.L, self.D)
        self.k, self.v, self.kw, self.alibi = k, v, key_weight, alibi
        self.scale, self.coeffs, self.causal, self.window = scale, tuple(coeffs), causal, window
        self.chunk = chunk
        self.fm = feature_map_for(q, scale, coeffs)
        self.mom = moments_for(self.fm)
        self.dt, self.dev = q.dtype, q.device
        self._bufs, self._bound_fns = {}, {}
        # bound functions are keyed by tensor addresses: real tensors only (fake and meta ones have none)
        self._addressable = active_fake_mode() is None and q.device.type != "meta" and not _is_fake(q)
        if alibi is not None:
            self.m = alibi.to(self.dt).view(self.Hk, self.G)  # [Hk, G]
            self.a = self.m.clamp_min(0.0)

    def spans(self, n):
        """(start, stop) of the chunks of [0, n)."""
        for i0 in range(0, n, self.chunk):
            yield i0, min(n, i0 + self.chunk)

    def blocks(self, n, chunked):
        """The blocks of [0, n), about BLOCK_ROWS rows each.  chunked (causal): g full chunks of ``chunk`` tokens
        per block, a partial last chunk alone; else (global) runs of whole chunks, g = 1."""
        C = self.chunk
        g = max(1, BLOCK_ROWS // (self.B * self.Hq * C))
        if not chunked:
            step = g * C
            return [Block(i0, min(n, i0 + step), 1, min(n, i0 + step) - i0) for i0 in range(0, n, step)]
        full = n // C
        out = [Block(c0 * C, (c0 + h) * C, h, C) for c0 in range(0, full, g) for h in [min(g, full - c0)]]
        if n % C:
            out.append(Block(full * C, n, 1, n - full * C))
        return out

    @staticmethod
    def rows(t, blk, dim=3):
        """View of the block's tokens of t ([B, Hk, G, L, ...] with dim 3, [B, Hk, S, ...] with dim 2) chunk-first:
        [g, B, Hk, (G,) C, ...].  Writing into the view writes into t."""
        return t.narrow(dim, blk.i0, blk.i1 - blk.i0).unflatten(dim, (blk.g, blk.C)).movedim(dim, 0)

    def buf(self, name, shape):
        """A contiguous scratch tensor reused across blocks (fresh multi-MB allocations page-fault)."""
        n = 1
        for x in shape:
            n *= x
        b = self._bufs.get(name)
        if b is None or b.numel() < n:
            b = self._bufs[name] = torch.empty(n, dtype=self.dt, device=self.dev)
        return b[:n].view(shape)

    def feature_major(self, x, name):
        """x [..., R, D] -> a contiguous copy [..., D, R] in the scratch buffer ``name``: block inputs of the
        feature maps live in buffers reused across blocks, so that their bound views (:meth:`phi`) are made once."""
        return self.buf(name, (*x.shape[:-2], x.shape[-1], x.shape[-2])).copy_(x.transpose(-1, -2))

    def _bound(self, key, tensors, bind):
        """The function ``bind()`` made for these tensors, made once per call.  Keyed by each tensor's address,
        shape and strides: a bound function keeps its tensors alive, so an address cannot be reused by another
        tensor while its entry exists."""
        if not self._addressable:
            return bind()
        key = (key, *((t.data_ptr(), t.shape, t.stride()) for t in tensors))
        fn = self._bound_fns.get(key)
        if fn is None:
            if len(self._bound_fns) >= 64:  # inputs that are not reused buffers: do not hold them all
                self._bound_fns.clear()
            fn = self._bound_fns[key] = bind()
        return fn

    def phi(self, xT, side):
        """Feature-major features of xT [..., D, R] -> [..., r, R] (side "q" or "k") in a reused scratch buffer."""
        out = self.buf("phi" + side, (*xT.shape[:-2], self.fm.rank, xT.shape[-1]))
        if not hasattr(self.fm, "bind_phi_t"):
            return self.fm.phi_t(xT, side, out=out)
        return self._bound(("phi", side), (xT, out), lambda: self.fm.bind_phi_t(xT, side, out))()

    def vjp(self, xT, dphi, side):
        """J_phi^T dphi, feature-major: xT [..., D, R], dphi [..., r, R] -> [..., D, R] (a scratch buffer)."""
        work = self.buf("vjp", (getattr(self.fm, "work_size", 0) * dphi[..., 0, :].numel(),))
        if not hasattr(self.fm, "bind_vjp_t"):
            return self.fm.vjp_t(xT, dphi, side, work=work)
        dx = self.buf("dx" + side, xT.shape)
        return self._bound(("vjp", side), (xT, dphi, work, dx), lambda: self.fm.bind_vjp_t(xT, dphi, side, dx, work))()

    def grouped(self, t):
        """Query rows [..., G, C, X] -> [..., Gs, (G / Gs) * C, X], the rows each state group reads."""
        return t.reshape(*t.shape[:-3], self.Gs, -1, t.shape[-1])

    def ungrouped(self, t, C):
        """Inverse of :meth:`grouped`: [..., Gs, (G / Gs) * C, X] -> [..., G, C, X]."""
        return t.reshape(*t.shape[:-3], self.G, C, t.shape[-1])

    def queries_t(self, qc):
        """Query rows [..., G, C, D] -> grouped and feature-major [..., Gs, D, (G / Gs) * C] (contiguous)."""
        return self.feature_major(self.grouped(qc), "qT")

    def positions(self, lo, hi):
        return torch.arange(lo, hi, device=self.dev, dtype=self.dt)

    def key_weights(self, j0, j1):
        """[B, C] key weights of keys j0..j1 in the compute dtype, or None."""
        return None if self.kw is None else self.kw[:, j0:j1].to(self.dt)

    def start_backward(self, grad, out):
        """Keep grad and out [B, Hq, L, Dv] as [B, Hk, G, L, Dv] for :meth:`grad_augmented`."""
        self.g5 = grad.view(self.B, self.Hk, self.G, self.L, self.Dv)
        self.o5 = out.view(self.B, self.Hk, self.G, self.L, self.Dv)

    def grad_augmented(self, grad_c, out_c, den):
        """Gd = [G / den | -Delta / den] (Delta = G . out) from grad and out rows [..., C, Dv], den [..., C]."""
        inv = safe_reciprocal(den).unsqueeze(-1)
        delta = (grad_c * out_c).sum(-1, keepdim=True)
        return torch.cat([grad_c * inv, -delta * inv], -1)

    def weighted_values(self, v, f):
        """X = f v per group: v [..., C, Dv], f [..., Gs, C] | None -> [..., C, Gs*Dv] (cat layout; f None: v)."""
        if f is None:
            return v
        return (f.unsqueeze(-1) * v.unsqueeze(-3)).transpose(-3, -2).flatten(-2)

    @staticmethod
    def store_normalised(num, den, out, den_out):
        """out = num / den and den_out = den into the views out [..., C, Dv] and den_out [..., C]."""
        out.copy_(num * safe_reciprocal(den).unsqueeze(-1))
        den_out.copy_(den)

    # ---- key factors (the part of the weight that depends on j only) [B, Hk, Gs, C] | None
    def global_key_factor(self, j0, j1):
        """exp(m (j - j*)) * key_weight_j with j* the argmax of m j (exponents <= 0)."""
        f = None
        if self.alibi is not None:
            jstar = torch.where(self.m > 0, float(self.S - 1), 0.0)
            f = torch.exp(self.m.unsqueeze(-1) * (self.positions(j0, j1) - jstar.unsqueeze(-1)))  # [Hk, G, C]
            f = f.unsqueeze(0)
        return self.with_key_weight(f, j0, j1)

    def causal_key_factor(self, blk):
        """[B, Hk, Gs, i1 - i0] | None: exp(a (j - c1) + (m - a) j) * key_weight_j (a = max(m, 0), c1 the end of
        j's chunk): the decayed state's key part, for the block's keys."""
        f = None
        if self.alibi is not None:
            j = self.positions(blk.i0, blk.i1)
            c1 = blk.i0 + (torch.div(j - blk.i0, blk.C, rounding_mode="floor") + 1) * blk.C
            f = torch.exp(self.a.unsqueeze(-1) * (j - c1) + (self.m - self.a).unsqueeze(-1) * j).unsqueeze(0)
        return self.with_key_weight(f, blk.i0, blk.i1)

    def with_key_weight(self, f, j0, j1):
        """Multiply a key factor (or None) by the key weights of keys j0..j1; [B, Hk, Gs, C] | None."""
        kw = self.key_weights(j0, j1)
        if kw is not None:
            kw = kw[:, None, None, :]
            f = kw if f is None else f * kw
        if f is not None:
            f = f.expand(self.B, self.Hk, self.Gs, j1 - j0)
        return f

    def causal_query_factor(self, C):
        """[Hk, G, C, 1] | None: exp(-a (i - i0)) for the C queries of a chunk starting at i0, the query part of
        the causal ALiBi factor."""
        if self.alibi is None:
            return None
        return torch.exp(-self.a.unsqueeze(-1) * self.positions(0, C)).unsqueeze(-1)

    @functools.cached_property
    def chunk_decay(self):
        """exp(-a chunk), the decay of a state over one chunk, shaped for States(values [..., r, Gs*Dv],
        moments [..., Gs, M]): ([Hk, 1, Gs*Dv], [Hk, Gs, 1]); None without ALiBi.  Computed once per call (the
        causal scans use it for every chunk)."""
        if self.alibi is None:
            return None
        gamma = torch.exp(-self.a * self.chunk).unsqueeze(-1)  # [Hk, G, 1]
        return gamma.expand(self.Hk, self.G, self.Dv).reshape(self.Hk, 1, -1), gamma

    # ---- a block of queries against keys, weighted directly (causal diagonal chunks, bands)
    def diagonal_multiplier(self, blk):
        """M [g, B|1, Hk|1, G|1, C, C] = causal mask * ALiBi factor * key weight of the block's diagonal chunks."""
        r = torch.arange(blk.C, device=self.dev)
        M = allowed_key_block(r.unsqueeze(-1), r.unsqueeze(0), True, 0).to(self.dt)  # the same in every chunk
        M = M.expand(blk.g, 1, 1, 1, blk.C, blk.C)
        if self.alibi is not None:
            rel = (r.unsqueeze(0) - r.unsqueeze(-1)).to(self.dt)  # j - i
            j = self.rows(self.positions(0, self.S).view(1, 1, 1, -1), blk)  # [g, 1, 1, 1, C]
            a, m = self.a[..., None, None], self.m[..., None, None]  # [Hk, G, 1, 1]
            lf = (a * rel + (m - a) * j.unsqueeze(-2)).masked_fill(M == 0, float("-inf"))
            M = torch.exp(lf) * M
        if self.kw is not None:
            M = M * self.rows(self.kw.to(self.dt).view(self.B, 1, 1, -1), blk).unsqueeze(-2)
        return M

    def block_multiplier(self, i0, i1, j0, j1):
        """M [B|1, Hk|1, G|1, Ci, Cj] = valid * ALiBi factor * key weight of a directly weighted block."""
        i = torch.arange(i0, i1, device=self.dev).unsqueeze(-1)
        j = torch.arange(j0, j1, device=self.dev).unsqueeze(0)
        M = allowed_key_block(i, j, self.causal, self.window).to(self.dt)
        if self.alibi is not None:
            lf = self._band_alibi_log_factor(i, j).masked_fill(M == 0, float("-inf"))
            M = torch.exp(lf).unsqueeze(0) * M
        kw = self.key_weights(j0, j1)
        if kw is not None:
            M = M * kw[:, None, None, None, :]
        return M

    def _band_alibi_log_factor(self, i, j):
        """[Hk, G, Ci, Cj] log of the banded ALiBi factor: m (j - i) minus the row maximum over the valid range."""
        m = self.m[..., None, None]  # [Hk, G, 1, 1]
        ii = i.to(self.dt)
        lo = (ii - self.window + 1).clamp_min(0)
        hi = ii if self.causal else (ii + self.window - 1).clamp_max(self.S - 1)
        off = torch.maximum(m * (lo - ii), m * (hi - ii))
        return m * (j - i).to(self.dt) - off

    def band(self, i0, i1):
        """The keys [j0, j1) that queries i0..i1 can see in the banded regime."""
        if self.causal:
            return max(0, i0 - self.window + 1), i1
        return max(0, i0 - self.window + 1), min(self.S, i1 + self.window - 1)
