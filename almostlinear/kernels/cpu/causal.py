"""The causal regime (no window): chunks of ``chunk`` tokens, g chunks per block (context.py).

Inside a chunk P(scale q.k) directly with a tril mask (direct.py, batched over the block's chunks); across chunks
the States of the keys before the chunk (values in the block-symmetric feature layout and the denominator's
moments, states.py): the block's chunk states come from one batched matmul, a scan over the chunks gives the
states before each chunk, and one batched matmul reads them all.  With ALiBi the states decay by exp(-a chunk)
per chunk (a = max(m, 0); key factor exp(a (j - c1) + (m - a) j) with c1 the end of j's chunk, query factor
exp(-a (i - i0))).  The backward recomputes the prefix states in forward order (dq, Gd, the diagonal chunks), or
reads the ones the forward kept (``keep``: per-chunk States [NC, B, Hk, ...], see cpu.KEEP_STATES_MIB), and
then the suffix sums of the query dstates in reverse order (dk, dv).

An initial state (``init``: States [B, Hk, ...] of keys before position 0, key factor exp(m j) for j < 0, e.g. the
earlier ranks' keys under context parallelism, kernels/context_parallel.py) starts the running key States, so
every chunk reads it with its prefix at no extra pass; its cotangent is the suffix sum of the query dstates
carried past chunk 0 (values: the true cotangent; moments: the queries' moments, not yet times the read's
coefficients).
"""
from __future__ import annotations

import torch

from .context import augment_values
from .direct import block_backward, block_numerator, direct_weights
from .states import (States, apply, key_grads, key_states, query_grads, query_states, read_denominator,
                     value_grads)


def _diagonal(cx, blk):
    """(qc [g, B, Hk, G, C, D], kc [g, B, Hk, C, D], vaug, M, s, W) of the block's diagonal chunks."""
    qc, kc = cx.rows(cx.q5, blk), cx.rows(cx.k, blk, 2)
    va = augment_values(cx.rows(cx.v, blk, 2))
    M = cx.diagonal_multiplier(blk)
    s, W = direct_weights(cx, qc, kc, M)
    return qc, kc, va, M, s, W


def _keys(cx, blk):
    """(keys^T [g, B, Hk, D, C], their features [g, B, Hk, r, C], X = f v [g, B, Hk, C, Gs*Dv],
    f [g, B, Hk, Gs, C] | None)."""
    kT = cx.feature_major(cx.rows(cx.k, blk, 2), "kT")
    f = cx.causal_key_factor(blk)
    if f is not None:
        f = f.unflatten(-1, (blk.g, blk.C)).movedim(-2, 0)
    return kT, cx.phi(kT, "k"), cx.weighted_values(cx.rows(cx.v, blk, 2), f), f


def _decayed_add(cx, prev, local, out):
    """out = exp(-a chunk) prev + local, field by field (States; no ALiBi: prev + local)."""
    gammas = cx.chunk_decay or (None, None)
    for p, x, o, gamma in zip(prev, local, out, gammas):
        torch.add(p, x, out=o) if gamma is None else torch.addcmul(x, p, gamma, out=o)


def _decay_in_place(cx, states):
    """states *= exp(-a chunk) (ALiBi only)."""
    if cx.alibi is not None:
        for t, gamma in zip(states, cx.chunk_decay):
            t.mul_(gamma)


def _buffers(cx, local):
    """Scratch States shaped like ``local`` ([g, ...] per field)."""
    return States(*(cx.buf(f"states_{name}", t.shape) for name, t in zip(States._fields, local)))


def _fill(dst, src):
    """Copy States src into dst field by field (None: zeros)."""
    for d, s in zip(dst, src or (None, None)):
        d.zero_() if s is None else d.copy_(s)


def _index(states, i):
    return States(*(t[i] for t in states))


def _as_block(run):
    """A running States [B, Hk, ...] as a block of one chunk [1, B, Hk, ...] (None stays None)."""
    return None if run is None else States(*(t.unsqueeze(0) for t in run))


def _empty_run(local):
    """An uninitialised running States shaped like one chunk of ``local``."""
    return States(*(torch.empty_like(t[0]) for t in local))


def _chunks_of(states, blk, C):
    """The block's chunks [g, B, Hk, ...] of per-chunk States [NC, B, Hk, ...] (a view)."""
    c0 = blk.i0 // C
    return States(*(t[c0:c0 + blk.g] for t in states))


class _KeyStates:
    """The running key States, block by block in forward order: :meth:`before` gives the States before each chunk
    of a block, :meth:`advance` moves past the block.  With ``keep`` (per-chunk States [NC, B, Hk, ...]) the
    States before every chunk are written there for the backward."""

    def __init__(self, cx, keep=None, init=None):
        # run: States [B, Hk, ...], the keys before the current block (a copy of init: it is updated in place)
        self.cx, self.keep = cx, keep
        self.run = None if init is None else States(*(t.clone() for t in init))

    def before(self, blk):
        """States [g, B, Hk, ...], or None where all are zero."""
        cx, self.blk, self.local = self.cx, blk, None
        if blk.g == 1:
            if self.keep is not None:
                _fill(_index(_chunks_of(self.keep, blk, cx.chunk), 0), self.run)
            return _as_block(self.run)
        self.local = key_states(cx, *_keys(cx, blk), scratch=True)  # each chunk's own keys
        sb = self.sb = _buffers(cx, self.local) if self.keep is None else _chunks_of(self.keep, blk, cx.chunk)
        _fill(_index(sb, 0), self.run)
        for c in range(1, blk.g):
            _decayed_add(cx, _index(sb, c - 1), _index(self.local, c - 1), _index(sb, c))
        return sb

    def advance(self):
        cx, blk = self.cx, self.blk
        if self.local is None:  # one chunk: add it in place
            kT, phk, X, f = _keys(cx, blk)
            if self.run is not None:
                _decay_in_place(cx, self.run)
            self.run = key_states(cx, kT[0], phk[0], X[0], None if f is None else f[0], into=self.run)
            return
        if self.run is None:
            self.run = _empty_run(self.local)
        _decayed_add(cx, _index(self.sb, -1), _index(self.local, -1), self.run)


class _KeptKeyStates:
    """The key States before each chunk as the forward kept them (:class:`_KeyStates` with ``keep``)."""

    def __init__(self, cx, kept, init=None):
        self.cx, self.kept, self.init = cx, kept, init

    def before(self, blk):
        if blk.i0 == 0 and blk.g == 1:
            return _as_block(self.init)
        return _chunks_of(self.kept, blk, self.cx.chunk)

    def advance(self):
        pass


class _QueryStates:
    """The running query dstates (phi_q^T Gv and the moments over the later chunks), block by block in reverse
    order: :meth:`after` gives the dstates after each chunk of a block, :meth:`advance` moves before the block."""

    def __init__(self, cx):
        self.cx, self.run = cx, None  # run: States [B, Hk, ...], the queries after the current block

    def after(self, blk, qT, phq, gd):
        """States [g, B, Hk, ...], or None where all are zero; qT, phq, gd: the block's queries, their features
        and Gd."""
        # qT and phq are the call's scratch buffers: advance() must run before the next block refills them
        cx, self.blk, self.local, self.pending = self.cx, blk, None, (qT, phq, gd)
        if blk.g == 1:
            return _as_block(self.run)
        self.local = query_states(cx, qT, phq, gd, scratch=True)
        sa = self.sa = _buffers(cx, self.local)
        _fill(_index(sa, -1), self.run)
        for c in range(blk.g - 2, -1, -1):
            _decayed_add(cx, _index(sa, c + 1), _index(self.local, c + 1), _index(sa, c))
        return sa

    def advance(self):
        cx = self.cx
        if self.local is None:
            qT, phq, gd = self.pending
            if self.run is not None:
                _decay_in_place(cx, self.run)
            self.run = query_states(cx, qT[0], phq[0], gd[0], into=self.run)
            return
        if self.run is None:
            self.run = _empty_run(self.local)
        _decayed_add(cx, _index(self.sa, 0), _index(self.local, 0), self.run)


def _with_query_factor(cx, t, C):
    """t [g, B, Hk, G, C, E] times the causal query factor exp(-a (i - i0)) (no ALiBi: t)."""
    qf = cx.causal_query_factor(C)
    return t if qf is None else t * qf


def causal_forward(cx, out, den, keep=None, init=None):
    """Fills out [B, Hk, G, L, Dv] and den [B, Hk, G, L]; with ``keep`` (States [NC, B, Hk, ...], NC the number
    of chunks) also the key States before each chunk, which the backward then reuses; ``init``: the initial
    States (module docstring)."""
    keys = _KeyStates(cx, keep, init)
    for blk in cx.blocks(cx.L, chunked=True):
        qc, _, va, _, _, W = _diagonal(cx, blk)
        num = block_numerator(W, va)
        states = keys.before(blk)
        if states is not None:
            qT = cx.queries_t(qc)
            z, _ = read_denominator(cx, qT, states.moments)
            inter = torch.cat([apply(cx, cx.phi(qT, "q"), states.values), z.unsqueeze(-1)], -1)
            num += _with_query_factor(cx, cx.ungrouped(inter, blk.C), blk.C)
        cx.store_normalised(num[..., :cx.Dv], num[..., cx.Dv], cx.rows(out, blk), cx.rows(den, blk))
        if blk.i1 < cx.L:
            keys.advance()


def causal_backward(cx, dq, dk, dv, kept=None, init=None):
    """Fills dq [B, Hk, G, L, D], adds to dk and dv; ``kept``: the forward's per-chunk key States (None:
    recomputed); ``init``: the forward's initial States, whose cotangent (States, see the module docstring) is
    returned (None without one)."""
    gds = cx.q5.new_empty(cx.B, cx.Hk, cx.G, cx.L, cx.Dv + 1)
    keys = _KeyStates(cx, init=init) if kept is None else _KeptKeyStates(cx, kept, init)
    _backward_forward_order(cx, dq, dk, dv, gds, keys)
    return _backward_reverse_order(cx, dk, dv, gds, init is not None)


def _backward_forward_order(cx, dq, dk, dv, gds, keys):
    """Pass A, blocks in forward order over the prefix States ``keys`` (recomputed or kept): dq, the diagonal
    chunks' dk and dv, and Gd [B, Hk, G, L, Dv+1] into gds."""
    for blk in cx.blocks(cx.L, chunked=True):
        qc, kc, va, M, s, W = _diagonal(cx, blk)
        den_c = W.sum(-1)
        states = keys.before(blk)
        if states is not None:
            qT = cx.queries_t(qc)
            z, cache = read_denominator(cx, qT, states.moments)
            z = cx.ungrouped(z.unsqueeze(-1), blk.C)
            den_c += _with_query_factor(cx, z, blk.C).squeeze(-1)
        gd = cx.grad_augmented(cx.rows(cx.g5, blk), cx.rows(cx.o5, blk), den_c)
        cx.rows(gds, blk).copy_(gd)
        a, b, c = block_backward(cx, qc, kc, va, M, gd, s, W)
        if states is not None:
            dqT = query_grads(cx, qT, states, cx.grouped(_with_query_factor(cx, gd, blk.C)), cache)
            a += cx.ungrouped(dqT.transpose(-1, -2), blk.C)
        cx.rows(dq, blk).copy_(a)
        cx.rows(dk, blk, 2).add_(b)
        cx.rows(dv, blk, 2).add_(c)
        if blk.i1 < cx.L:
            keys.advance()


def _backward_reverse_order(cx, dk, dv, gds, with_init=False):
    """Pass B, blocks in reverse order: the keys' gradients through the suffix sums of the query dstates; with an
    initial state, the dstates of all the queries (its cotangent) are returned."""
    queries = _QueryStates(cx)
    for blk in reversed(cx.blocks(cx.L, chunked=True)):
        if blk.g == 1 and blk.i0 == 0 and queries.run is None and not with_init:
            continue  # a single chunk: no later queries
        gd = cx.grouped(_with_query_factor(cx, cx.rows(gds, blk), blk.C))
        qT = phq = None
        if blk.g > 1 or blk.i0 > 0 or with_init:
            qT = cx.queries_t(cx.rows(cx.q5, blk))
            phq = cx.phi(qT, "q")
        dstates = queries.after(blk, qT, phq, gd)
        if dstates is not None:
            kT, phk, X, f = _keys(cx, blk)
            dX, dkT = key_grads(cx, kT, phk, X, f, dstates)
            cx.rows(dk, blk, 2).add_(dkT.transpose(-1, -2))
            cx.rows(dv, blk, 2).add_(value_grads(cx, dX, f))
        if blk.i0 > 0 or with_init:
            queries.advance()
    return queries.run if with_init else None
