"""The causal regime (no window): chunks of ``chunk`` tokens, g chunks per block (context.py).

Inside a chunk P(scale q.k) directly with a tril mask (direct.py, batched over the block's chunks); across chunks
the state of the keys before the chunk, in the block-symmetric feature layout (states.py): the block's chunk
states phi_k^T X come from one batched matmul, a scan over the chunks gives the state before each chunk, and
one batched matmul reads them all.  With ALiBi the state decays by exp(-a chunk) per chunk (a = max(m, 0); key
factor exp(a (j - c1) + (m - a) j) with c1 the end of j's chunk, query factor exp(-a (i - i0))).
The backward recomputes the prefix states in forward order (dq, Gd, the diagonal chunks) and then the suffix
sums of phi_q^T Gd in reverse order (dk, dv).
"""
from __future__ import annotations

import torch

from .context import augment_values
from .direct import block_backward, block_numerator, direct_weights
from .states import (accumulate_product, apply, apply_denominator, apply_transposed, key_grads, query_state,
                     value_grads)


def _diagonal(cx, blk):
    """(qc [g, B, Hk, G, C, D], kc [g, B, Hk, C, D], vaug, M, s, W) of the block's diagonal chunks."""
    qc, kc = cx.rows(cx.q5, blk), cx.rows(cx.k, blk, 2)
    va = augment_values(cx.rows(cx.v, blk, 2), None)
    M = cx.diagonal_multiplier(blk)
    s, W = direct_weights(cx, qc, kc, M)
    return qc, kc, va, M, s, W


def _keys(cx, blk):
    """(keys^T [g, B, Hk, D, C], their features [g, B, Hk, r, C], X = [f v | f] [g, B, Hk, C, Gs*E],
    f [g, B, Hk, Gs, C] | None)."""
    kT = cx.rows(cx.k, blk, 2).transpose(-1, -2).contiguous()
    f = cx.causal_key_factor(blk)
    if f is not None:
        f = f.unflatten(-1, (blk.g, blk.C)).movedim(-2, 0)
    return kT, cx.phi(kT, "k"), augment_values(cx.rows(cx.v, blk, 2), f), f


def _decayed_add(cx, prev, local, out):
    """out = exp(-a chunk) prev + local (cat-layout states; no ALiBi: prev + local)."""
    gamma = cx.chunk_decay(cx.chunk)
    if gamma is None:
        return torch.add(prev, local, out=out)
    return torch.addcmul(local, prev, gamma.unsqueeze(-2), out=out)


class _KeyStates:
    """The running key state, block by block in forward order: :meth:`before` gives the state before each chunk
    of a block, :meth:`advance` moves past the block."""

    def __init__(self, cx):
        self.cx, self.run = cx, None  # run: [B, Hk, r, Gs*E], the keys before the current block

    def before(self, blk):
        """[g, B, Hk, r, Gs*E], or None where all are zero."""
        cx, self.blk, self.local = self.cx, blk, None
        if blk.g == 1:
            return None if self.run is None else self.run.unsqueeze(0)
        _, phk, X, _ = _keys(cx, blk)
        self.local = phk @ X  # each chunk's own keys
        sb = self.sb = cx.buf("states", self.local.shape)
        sb[0].zero_() if self.run is None else sb[0].copy_(self.run)
        for c in range(1, blk.g):
            _decayed_add(cx, sb[c - 1], self.local[c - 1], sb[c])
        return sb

    def advance(self):
        cx, blk = self.cx, self.blk
        if self.local is None:  # one chunk: add it in place
            _, phk, X, _ = _keys(cx, blk)
            if self.run is not None and cx.alibi is not None:
                self.run.mul_(cx.chunk_decay(cx.chunk).unsqueeze(-2))
            self.run = accumulate_product(self.run, phk[0], X[0])
            return
        if self.run is None:
            self.run = torch.empty_like(self.local[0])
        _decayed_add(cx, self.sb[-1], self.local[-1], self.run)


class _QueryStates:
    """The running query dstate (sum of phi_q^T Gd over the later chunks), block by block in reverse order:
    :meth:`after` gives the dstate after each chunk of a block, :meth:`advance` moves before the block."""

    def __init__(self, cx):
        self.cx, self.run = cx, None  # run: [B, Hk, r, Gs*E], the queries after the current block

    def after(self, blk, phq, gd):
        """[g, B, Hk, r, Gs*E], or None where all are zero; phq, gd: the block's query features and Gd."""
        cx, self.blk, self.local, self.pending = self.cx, blk, None, (phq, gd)
        if blk.g == 1:
            return None if self.run is None else self.run.unsqueeze(0)
        self.local = query_state(cx, phq, gd)
        sa = self.sa = cx.buf("states", self.local.shape)
        sa[-1].zero_() if self.run is None else sa[-1].copy_(self.run)
        for c in range(blk.g - 2, -1, -1):
            _decayed_add(cx, sa[c + 1], self.local[c + 1], sa[c])
        return sa

    def advance(self):
        cx = self.cx
        if self.local is None:
            phq, gd = self.pending
            if self.run is not None and cx.alibi is not None:
                self.run.mul_(cx.chunk_decay(cx.chunk).unsqueeze(-2))
            self.run = query_state(cx, phq[0], gd[0], into=self.run)
            return
        if self.run is None:
            self.run = torch.empty_like(self.local[0])
        _decayed_add(cx, self.sa[0], self.local[0], self.run)


def _with_query_factor(cx, t, C):
    """t [g, B, Hk, G, C, E] times the causal query factor exp(-a (i - i0)) (no ALiBi: t)."""
    qf = cx.causal_query_factor(C)
    return t if qf is None else t * qf


def causal_forward(cx, out, den):
    """Fills out [B, Hk, G, L, Dv] and den [B, Hk, G, L]."""
    keys = _KeyStates(cx)
    for blk in cx.blocks(cx.L, chunked=True):
        qc, _, va, _, _, W = _diagonal(cx, blk)
        num = block_numerator(W, va)
        states = keys.before(blk)
        if states is not None:
            inter = cx.ungrouped(apply(cx, cx.phi(cx.queries_t(qc), "q"), states), blk.C)
            num += _with_query_factor(cx, inter, blk.C)
        cx.store_normalised(num, cx.rows(out, blk), cx.rows(den, blk))
        if blk.i1 < cx.L:
            keys.advance()


def causal_backward(cx, dq, dk, dv):
    """Fills dq [B, Hk, G, L, D], adds to dk and dv."""
    gds = cx.q5.new_empty(cx.B, cx.Hk, cx.G, cx.L, cx.Dv + 1)
    _backward_forward_order(cx, dq, dk, dv, gds)
    _backward_reverse_order(cx, dk, dv, gds)


def _backward_forward_order(cx, dq, dk, dv, gds):
    """Pass A, blocks in forward order with the prefix states recomputed: dq, the diagonal chunks' dk and dv,
    and Gd [B, Hk, G, L, Dv+1] into gds."""
    keys = _KeyStates(cx)
    for blk in cx.blocks(cx.L, chunked=True):
        qc, kc, va, M, s, W = _diagonal(cx, blk)
        den_c = W.sum(-1)
        states = keys.before(blk)
        if states is not None:
            qT = cx.queries_t(qc)
            z = cx.ungrouped(apply_denominator(cx, cx.phi(qT, "q"), states).unsqueeze(-1), blk.C)
            den_c += _with_query_factor(cx, z, blk.C).squeeze(-1)
        gd = cx.grad_augmented(cx.rows(cx.g5, blk), cx.rows(cx.o5, blk), den_c)
        cx.rows(gds, blk).copy_(gd)
        a, b, c = block_backward(cx, qc, kc, va, M, gd, s, W)
        if states is not None:
            dphi = apply_transposed(cx, cx.grouped(_with_query_factor(cx, gd, blk.C)), states)
            a += cx.ungrouped(cx.vjp(qT, dphi, "q").transpose(-1, -2), blk.C)
        cx.rows(dq, blk).copy_(a)
        cx.rows(dk, blk, 2).add_(b)
        cx.rows(dv, blk, 2).add_(c)
        if blk.i1 < cx.L:
            keys.advance()


def _backward_reverse_order(cx, dk, dv, gds):
    """Pass B, blocks in reverse order: the keys' gradients through the suffix sums of phi_q^T Gd."""
    queries = _QueryStates(cx)
    for blk in reversed(cx.blocks(cx.L, chunked=True)):
        if blk.g == 1 and blk.i0 == 0 and queries.run is None:
            continue  # a single chunk: no later queries
        gd = cx.grouped(_with_query_factor(cx, cx.rows(gds, blk), blk.C))
        phq = cx.phi(cx.queries_t(cx.rows(cx.q5, blk)), "q") if (blk.g > 1 or blk.i0 > 0) else None
        dstates = queries.after(blk, phq, gd)
        if dstates is not None:
            kT, phk, X, f = _keys(cx, blk)
            dX, dkT = key_grads(cx, kT, phk, X, dstates)
            cx.rows(dk, blk, 2).add_(dkT.transpose(-1, -2))
            cx.rows(dv, blk, 2).add_(value_grads(cx, dX, f))
        if blk.i0 > 0:
            queries.advance()
