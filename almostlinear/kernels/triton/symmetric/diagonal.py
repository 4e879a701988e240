"""The flash-style kernels over rows of queries: the causal diagonal (intra-chunk) blocks with P(s) directly and
the normalisation (forward), the backward's Gv / gden preparation, and the diagonal blocks' share of dq, dk, dv."""
from __future__ import annotations

import triton
import triton.language as tl

from .features import dot, load_key_weight


@triton.jit
def diag_block(q, K, V, KW, bb, kh, S, rows, n0, hi, scale, c0, c1, c2, D: tl.constexpr, E: tl.constexpr,
                BLOCK_N: tl.constexpr, HAS_KW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Keys n0..n0+BLOCK_N (below hi) of kv head kh against the query rows q: (k, v, s = scale q.k, f, allowed,
    W = P(s) f on the allowed causal entries, else 0)."""
    DT = K.dtype.element_ty
    d = tl.arange(0, D)
    cols = n0 + tl.arange(0, BLOCK_N)
    cm = cols < hi
    f = load_key_weight(KW, bb, S, cols, cm, HAS_KW)
    k = tl.load(K + kh * S * D + cols[:, None] * D + d[None, :], mask=cm[:, None], other=0.0)
    v = tl.load(V + kh * S * E + cols[:, None] * E + tl.arange(0, E)[None, :], mask=cm[:, None], other=0.0)
    s = dot(q, tl.trans(k), DT, PREC, UPCAST) * scale
    ok = (cols[None, :] <= rows[:, None]) & cm[None, :]
    W = tl.where(ok, (c0 + s * (c1 + c2 * s)) * f[None, :], 0.0)
    return k, v, s, f, ok, W


@triton.jit
def diag_fwd_kernel(Q, K, V, KW, NUM, DEN, OUT, L, S, Hq, G, scale, c0, c1, c2,
                     D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KW: tl.constexpr, PREC: tl.constexpr,
                     UPCAST: tl.constexpr):
    """grid (B*Hq, L / BLOCK_M).  Causal: NUM, DEN += the chunk's keys up to the diagonal (W = P(s) f mask).
    Then OUT = NUM / DEN (0 where DEN = 0) in OUT's dtype; DEN keeps the final denominator."""
    DT = Q.dtype.element_ty
    qh = tl.program_id(0).to(tl.int64)
    m0 = tl.program_id(1) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    rm = rows < L
    ev = tl.arange(0, E)
    d = tl.arange(0, D)
    num = tl.load(NUM + qh * L * E + rows[:, None] * E + ev[None, :], mask=rm[:, None], other=0.0)
    den = tl.load(DEN + qh * L + rows, mask=rm, other=0.0)
    if CAUSAL:
        kh = qh // G
        q = tl.load(Q + qh * L * D + rows[:, None] * D + d[None, :], mask=rm[:, None], other=0.0)
        lo = (m0 // CHUNK) * CHUNK
        hi = tl.minimum(m0 + BLOCK_M, S)
        for n0 in range(lo, hi, BLOCK_N):
            _, v, _, _, _, W = diag_block(q, K, V, KW, qh // Hq, kh, S, rows, n0, hi, scale, c0, c1, c2, D, E,
                                           BLOCK_N, HAS_KW, PREC, UPCAST)
            num += dot(W, v, DT, PREC, UPCAST)
            den += tl.sum(W, 1)
        tl.store(DEN + qh * L + rows, den, mask=rm)
    pos = den > 0
    out = tl.where(pos[:, None], num / tl.where(pos, den, 1.0)[:, None], 0.0)
    tl.store(OUT + qh * L * E + rows[:, None] * E + ev[None, :], out.to(OUT.dtype.element_ty), mask=rm[:, None])


@triton.jit
def bwd_prep_kernel(GRAD, OUT, DEN, GV, GDEN, L, E: tl.constexpr, BLOCK_M: tl.constexpr):
    """grid (B*Hq, L / BLOCK_M): GV = grad / den (GV's dtype), GDEN = -(grad.out) / den; 0 where den = 0."""
    qh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < L
    off = qh * L * E + rows[:, None] * E + tl.arange(0, E)[None, :]
    g = tl.load(GRAD + off, mask=rm[:, None], other=0.0).to(tl.float32)
    o = tl.load(OUT + off, mask=rm[:, None], other=0.0).to(tl.float32)
    den = tl.load(DEN + qh * L + rows, mask=rm, other=0.0)
    inv = tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(GV + off, (g * inv[:, None]).to(GV.dtype.element_ty), mask=rm[:, None])
    tl.store(GDEN + qh * L + rows, -tl.sum(g * o, 1) * inv, mask=rm)


@triton.jit
def diag_bwd_kernel(Q, K, V, KW, GV, GDEN, DQ, DK, DV, L, S, Hq, G, scale, c0, c1, c2,
                     D: tl.constexpr, E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, HAS_KW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """grid (B*Hq, L / BLOCK_M), causal: the diagonal blocks' share of dq (added), dk and dv (atomics)."""
    DT = Q.dtype.element_ty
    qh = tl.program_id(0).to(tl.int64)
    kh = qh // G
    m0 = tl.program_id(1) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    rm = rows < L
    ev = tl.arange(0, E)
    d = tl.arange(0, D)
    q = tl.load(Q + qh * L * D + rows[:, None] * D + d[None, :], mask=rm[:, None], other=0.0)
    gv = tl.load(GV + qh * L * E + rows[:, None] * E + ev[None, :], mask=rm[:, None], other=0.0)
    gd = tl.load(GDEN + qh * L + rows, mask=rm, other=0.0)
    dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    lo = (m0 // CHUNK) * CHUNK
    hi = tl.minimum(m0 + BLOCK_M, S)
    for n0 in range(lo, hi, BLOCK_N):
        k, v, s, f, ok, W = diag_block(q, K, V, KW, qh // Hq, kh, S, rows, n0, hi, scale, c0, c1, c2, D, E,
                                        BLOCK_N, HAS_KW, PREC, UPCAST)
        cols = n0 + tl.arange(0, BLOCK_N)
        cm = cols < hi
        dW = dot(gv, tl.trans(v), DT, PREC, UPCAST) + gd[:, None]
        ds = tl.where(ok, dW * (c1 + 2.0 * c2 * s) * f[None, :], 0.0) * scale
        dq += dot(ds, k, DT, PREC, UPCAST)
        tl.atomic_add(DK + kh * S * D + cols[:, None] * D + d[None, :], dot(tl.trans(ds), q, DT, PREC, UPCAST),
                      mask=cm[:, None], sem="relaxed")
        tl.atomic_add(DV + kh * S * E + cols[:, None] * E + ev[None, :], dot(tl.trans(W), gv, DT, PREC, UPCAST),
                      mask=cm[:, None], sem="relaxed")
    tl.atomic_add(DQ + qh * L * D + rows[:, None] * D + d[None, :], dq, mask=rm[:, None], sem="relaxed")
