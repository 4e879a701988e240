"""The sweep kernels: one program per (batch * kv head, tile pair or the linear part, value block) keeps its state
tile on chip and walks the sequence in chunks (see the package docstring).  kv_sweep_kernel: the key state (the
forward's NUM / DEN, or dq in the backward); q_sweep_kernel: the query state in reverse order (dk and dv)."""
from __future__ import annotations

import triton
import triton.language as tl

from .features import dot, load_key_weight, load_tiles, outer, outer_vjp, program_start


# ----------------------------------------------------------------------- key-state sweep (forward and dq)

@triton.jit
def kv_keys(K, V, KW, st, z, s0, z0, bkv, eb, Hk, S, lo, hi, I, J,
             D: tl.constexpr, E: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
             HAS_KW: tl.constexpr, LIN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Add the keys lo..hi-1 to the state: st += phi_k^T (f v), z += f phi_k (LIN: also s0 += f v, z0 += f)."""
    DT = K.dtype.element_ty
    kh = bkv.to(tl.int64)
    Kh = K + kh * S * D
    Vh = V + kh * S * E
    e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cm = cols < hi
        f = load_key_weight(KW, bkv // Hk, S, cols, cm, HAS_KW)
        fv = tl.load(Vh + cols[:, None] * E + e[None, :], mask=cm[:, None], other=0.0).to(tl.float32) * f[:, None]
        if LIN:
            x = tl.load(Kh + cols[:, None] * D + tl.arange(0, D)[None, :], mask=cm[:, None],
                        other=0.0).to(tl.float32)
            s0 += tl.sum(fv, 0)
            z0 += tl.sum(f, 0)
        else:
            a, b = load_tiles(Kh, cols, cm, I, J, D, T)
            x = outer(a, b, BLOCK_N, T)
        st += dot(tl.trans(x), fv, DT, PREC, UPCAST)
        z += tl.sum(x * f[:, None], 0)
    return st, z, s0, z0


@triton.jit
def kv_queries(Q, GV, GDEN, NUM, DEN, DQ, st, z, s0, z0, bkv, eb, G, L, lo, hi, I, J, w, c0, c1s,
                D: tl.constexpr, E: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                BWD: tl.constexpr, LIN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Queries lo..hi-1 of the G heads of kv head bkv against the state.  Forward: NUM += phi_q st,
    DEN += phi_q.z.  BWD: DQ += J_phi_q^T (Gv st^T + gden z^T)."""
    DT = Q.dtype.element_ty
    e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
    d = tl.arange(0, D)
    t = tl.arange(0, T)
    for g in range(0, G):
        qh = (bkv * G + g).to(tl.int64)
        Qh = Q + qh * L * D
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rm = rows < hi
            if BWD:
                gv = tl.load(GV + qh * L * E + rows[:, None] * E + e[None, :], mask=rm[:, None], other=0.0)
                dphi = dot(gv, tl.trans(st), DT, PREC, UPCAST)
                if eb == 0:
                    gd = tl.load(GDEN + qh * L + rows, mask=rm, other=0.0)
                    dphi += gd[:, None] * z[None, :]
                DQh = DQ + qh * L * D + rows[:, None] * D
                if LIN:
                    tl.atomic_add(DQh + d[None, :], dphi * c1s, mask=rm[:, None], sem="relaxed")
                else:
                    a, b = load_tiles(Qh, rows, rm, I, J, D, T)
                    da, db = outer_vjp(dphi * w, a, b, BLOCK_M, T)
                    tl.atomic_add(DQh + I * T + t[None, :], da, mask=rm[:, None], sem="relaxed")
                    tl.atomic_add(DQh + J * T + t[None, :], db, mask=rm[:, None], sem="relaxed")
            else:
                if LIN:
                    x = tl.load(Qh + rows[:, None] * D + d[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
                    x = x * c1s
                    acc = dot(x, st, DT, PREC, UPCAST) + c0 * s0[None, :]
                else:
                    a, b = load_tiles(Qh, rows, rm, I, J, D, T)
                    x = outer(a, b, BLOCK_M, T) * w
                    acc = dot(x, st, DT, PREC, UPCAST)
                tl.atomic_add(NUM + qh * L * E + rows[:, None] * E + e[None, :], acc, mask=rm[:, None], sem="relaxed")
                if eb == 0:
                    dn = tl.sum(x * z[None, :], 1)
                    if LIN:
                        dn += c0 * z0
                    tl.atomic_add(DEN + qh * L + rows, dn, mask=rm, sem="relaxed")


@triton.jit
def kv_sweep(Q, K, V, KW, GV, GDEN, NUM, DEN, DQ, p, L, S, Hk, G, NC, c0, c1s, c2s,
              D: tl.constexpr, E: tl.constexpr, T: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr, HAS_KW: tl.constexpr,
              BWD: tl.constexpr, LIN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    bkv, eb, I, J, w, st, z, s0 = program_start(p, c1s, c2s, D, T, BLOCK_E, LIN)
    z0 = tl.sum(s0, 0)
    if CAUSAL:
        for c in range(0, NC):
            lo = c * CHUNK
            if c > 0:
                kv_queries(Q, GV, GDEN, NUM, DEN, DQ, st, z, s0, z0, bkv, eb, G, L, lo, tl.minimum(lo + CHUNK, L),
                            I, J, w, c0, c1s, D, E, T, BLOCK_M, BLOCK_E, BWD, LIN, PREC, UPCAST)
            st, z, s0, z0 = kv_keys(K, V, KW, st, z, s0, z0, bkv, eb, Hk, S, lo, tl.minimum(lo + CHUNK, S), I, J,
                                     D, E, T, BLOCK_N, BLOCK_E, HAS_KW, LIN, PREC, UPCAST)
    else:
        st, z, s0, z0 = kv_keys(K, V, KW, st, z, s0, z0, bkv, eb, Hk, S, 0, S, I, J,
                                 D, E, T, BLOCK_N, BLOCK_E, HAS_KW, LIN, PREC, UPCAST)
        kv_queries(Q, GV, GDEN, NUM, DEN, DQ, st, z, s0, z0, bkv, eb, G, L, 0, L,
                    I, J, w, c0, c1s, D, E, T, BLOCK_M, BLOCK_E, BWD, LIN, PREC, UPCAST)


@triton.jit
def kv_sweep_kernel(Q, K, V, KW, GV, GDEN, NUM, DEN, DQ, L, S, Hk, G, NC, c0, c1s, c2s,
                     D: tl.constexpr, E: tl.constexpr, T: tl.constexpr, NP: tl.constexpr, CHUNK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_KW: tl.constexpr, BWD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """grid (B*Hk, NP + 1, E / BLOCK_E): program (kv head, pair p, value block); p == NP is the linear and
    constant part."""
    p = tl.program_id(1)
    if p < NP:
        kv_sweep(Q, K, V, KW, GV, GDEN, NUM, DEN, DQ, p, L, S, Hk, G, NC, c0, c1s, c2s, D, E, T, CHUNK, BLOCK_M,
                  BLOCK_N, BLOCK_E, CAUSAL, HAS_KW, BWD, False, PREC, UPCAST)
    else:
        kv_sweep(Q, K, V, KW, GV, GDEN, NUM, DEN, DQ, p, L, S, Hk, G, NC, c0, c1s, c2s, D, E, T, CHUNK, BLOCK_M,
                  BLOCK_N, BLOCK_E, CAUSAL, HAS_KW, BWD, True, PREC, UPCAST)


# ------------------------------------------------------------------------- query-state sweep (dk and dv)

@triton.jit
def q_queries(Q, GV, GDEN, dst, dz, ds0, bkv, eb, G, L, lo, hi, I, J, w, c0, c1s,
               D: tl.constexpr, E: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
               LIN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Add the queries lo..hi-1 (G heads): dst += phi_q^T Gv, dz += gden phi_q (LIN: ds0 += c0 Gv)."""
    DT = Q.dtype.element_ty
    e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
    for g in range(0, G):
        qh = (bkv * G + g).to(tl.int64)
        Qh = Q + qh * L * D
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rm = rows < hi
            gv = tl.load(GV + qh * L * E + rows[:, None] * E + e[None, :], mask=rm[:, None], other=0.0)
            gd = tl.load(GDEN + qh * L + rows, mask=rm, other=0.0)
            if LIN:
                x = tl.load(Qh + rows[:, None] * D + tl.arange(0, D)[None, :], mask=rm[:, None],
                            other=0.0).to(tl.float32)
                x = x * c1s
                ds0 += c0 * tl.sum(gv.to(tl.float32), 0)
            else:
                a, b = load_tiles(Qh, rows, rm, I, J, D, T)
                x = outer(a, b, BLOCK_M, T) * w
            dst += dot(tl.trans(x), gv, DT, PREC, UPCAST)
            dz += tl.sum(x * gd[:, None], 0)
    return dst, dz, ds0


@triton.jit
def q_keys(K, V, KW, DK, DV, dst, dz, ds0, bkv, eb, Hk, S, lo, hi, I, J,
            D: tl.constexpr, E: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
            HAS_KW: tl.constexpr, LIN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Keys lo..hi-1 against the query state: DV += f phi_k dst (+ f ds0), DK += J_phi_k^T (f (v dst^T + dz))."""
    DT = K.dtype.element_ty
    kh = bkv.to(tl.int64)
    Kh = K + kh * S * D
    e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
    d = tl.arange(0, D)
    t = tl.arange(0, T)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cm = cols < hi
        f = load_key_weight(KW, bkv // Hk, S, cols, cm, HAS_KW)
        v = tl.load(V + kh * S * E + cols[:, None] * E + e[None, :], mask=cm[:, None], other=0.0)
        dphi = dot(v, tl.trans(dst), DT, PREC, UPCAST)
        if eb == 0:
            dphi += dz[None, :]
        dphi = dphi * f[:, None]
        DKh = DK + kh * S * D + cols[:, None] * D
        if LIN:
            x = tl.load(Kh + cols[:, None] * D + d[None, :], mask=cm[:, None], other=0.0).to(tl.float32)
            dv = dot(x, dst, DT, PREC, UPCAST) + ds0[None, :]
            tl.atomic_add(DKh + d[None, :], dphi, mask=cm[:, None], sem="relaxed")
        else:
            a, b = load_tiles(Kh, cols, cm, I, J, D, T)
            dv = dot(outer(a, b, BLOCK_N, T), dst, DT, PREC, UPCAST)
            da, db = outer_vjp(dphi, a, b, BLOCK_N, T)
            tl.atomic_add(DKh + I * T + t[None, :], da, mask=cm[:, None], sem="relaxed")
            tl.atomic_add(DKh + J * T + t[None, :], db, mask=cm[:, None], sem="relaxed")
        tl.atomic_add(DV + kh * S * E + cols[:, None] * E + e[None, :], dv * f[:, None], mask=cm[:, None],
                      sem="relaxed")


@triton.jit
def q_sweep(Q, K, V, KW, GV, GDEN, DK, DV, p, L, S, Hk, G, NC, c0, c1s, c2s,
             D: tl.constexpr, E: tl.constexpr, T: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr, HAS_KW: tl.constexpr,
             LIN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    bkv, eb, I, J, w, dst, dz, ds0 = program_start(p, c1s, c2s, D, T, BLOCK_E, LIN)
    if CAUSAL:
        for cc in range(0, NC):
            lo = (NC - 1 - cc) * CHUNK
            if cc > 0:
                q_keys(K, V, KW, DK, DV, dst, dz, ds0, bkv, eb, Hk, S, lo, tl.minimum(lo + CHUNK, S), I, J,
                        D, E, T, BLOCK_N, BLOCK_E, HAS_KW, LIN, PREC, UPCAST)
            dst, dz, ds0 = q_queries(Q, GV, GDEN, dst, dz, ds0, bkv, eb, G, L, lo, tl.minimum(lo + CHUNK, L),
                                      I, J, w, c0, c1s, D, E, T, BLOCK_M, BLOCK_E, LIN, PREC, UPCAST)
    else:
        dst, dz, ds0 = q_queries(Q, GV, GDEN, dst, dz, ds0, bkv, eb, G, L, 0, L,
                                  I, J, w, c0, c1s, D, E, T, BLOCK_M, BLOCK_E, LIN, PREC, UPCAST)
        q_keys(K, V, KW, DK, DV, dst, dz, ds0, bkv, eb, Hk, S, 0, S, I, J,
                D, E, T, BLOCK_N, BLOCK_E, HAS_KW, LIN, PREC, UPCAST)


@triton.jit
def q_sweep_kernel(Q, K, V, KW, GV, GDEN, DK, DV, L, S, Hk, G, NC, c0, c1s, c2s,
                    D: tl.constexpr, E: tl.constexpr, T: tl.constexpr, NP: tl.constexpr, CHUNK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_KW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """grid (B*Hk, NP + 1, E / BLOCK_E), like :func:`kv_sweep_kernel`, walking the chunks in reverse."""
    p = tl.program_id(1)
    if p < NP:
        q_sweep(Q, K, V, KW, GV, GDEN, DK, DV, p, L, S, Hk, G, NC, c0, c1s, c2s, D, E, T, CHUNK, BLOCK_M,
                 BLOCK_N, BLOCK_E, CAUSAL, HAS_KW, False, PREC, UPCAST)
    else:
        q_sweep(Q, K, V, KW, GV, GDEN, DK, DV, p, L, S, Hk, G, NC, c0, c1s, c2s, D, E, T, CHUNK, BLOCK_M,
                 BLOCK_N, BLOCK_E, CAUSAL, HAS_KW, True, PREC, UPCAST)
