"""Degree-2 polynomial attention in Triton with block-symmetric features and on-chip state passing (issue 13).

CUDA; also runs under ``TRITON_INTERPRET=1`` on CPU tensors (the tests do that on small shapes, and compile
the GPU configuration for sm_90 without a GPU).  Covers degree
2, D and Dv in {16, 32, 64, 128}, masks none / causal / key padding / causal + key padding (a per-key weight
``key_weight``), GQA without repeating K/V.  ALiBi and windowed attention stay on the torch path
(``kernels/cpu/``): ALiBi needs a decayed state (one more factor per key and chunk) and a window a banded
walk, neither of which this state-passing layout has (issue 13 leaves them on the torch path).

Math.  s = scale q.k, P(s) = c0 + c1 s + c2 s^2, W_ij = P(s_ij) f_j [j allowed for i] (f = key_weight or 1),
out_i = sum_j W_ij v_j / den_i, den_i = sum_j W_ij (a row with den = 0 gives 0).  With the head dim cut into
tiles of T = 16 coordinates (NT = D / T tiles, pairs I <= J, NP = NT (NT + 1) / 2: 1, 3, 10, 36)::

    (q.k)^2 = sum_{I<=J} w_IJ (q_I (x) q_J).(k_I (x) k_J),     w_IJ = 1 if I == J else 2

so P(s) = phi_q(q).phi_k(k) with, per pair, a [T*T = 256]-wide block phi_k = k_I (x) k_J and
phi_q = c2 scale^2 w_IJ q_I (x) q_J (the query side carries every coefficient), plus the linear block
(phi_q = c1 scale q, phi_k = k) and the constant (c0, 1).  No feature ever exists in HBM: each program builds
its block in registers, ``reshape(a[:, :, None] * b[:, None, :], (BLOCK, 256))``, and feeds tensor-core dots.
The linear and constant parts run inside the same sweep kernels as one more "pair" program (p == NP) with a
D-wide feature and the constant's state beside it: no extra launch, no HBM state, no torch ops; its work is
D/256 of a pair's (a few per cent of the quadratic part at D = 64).

Kernels (shapes: q [B, Hq, L, D], k [B, Hk, S, D], v [B, Hk, S, E] with E = Dv, G = Hq // Hk, all contiguous;
fp32 accumulators NUM [B, Hq, L, E], DEN [B, Hq, L], DQ/DK/DV like q/k/v)::

    _kv_sweep_kernel   grid (B*Hk, NP + 1, E / BLOCK_E).  One program keeps the key state of its pair,
                       ST = sum_j phi_k(k_j)^T (f_j v_j) [256 | D, BLOCK_E] and z = sum_j f_j phi_k(k_j) [256 | D]
                       (plus s0 = sum f v, z0 = sum f for the constant), fp32, on chip, and walks the sequence
                       in chunks of CHUNK rows: causal, chunk c's queries (all G heads, BLOCK_M rows at a time)
                       read the state of the chunks < c, then chunk c's keys are added (BLOCK_N at a time);
                       non-causal, all keys then all queries.  Forward: NUM += phi_q ST, DEN += phi_q.z (the
                       Dv-block-0 program only), fp32 atomics (all pairs write the same rows).  Backward (BWD):
                       dphi_q = Gv ST^T + gden z^T, then the tile VJP into DQ (atomics).
    _diag_fwd_kernel   grid (B*Hq, L / BLOCK_M): causal, the keys of the query block's own chunk up to the
                       diagonal, W = P(s) f mask directly (flash-style, no running max: P > 0), added to NUM and
                       DEN; then out = NUM / DEN (0 where DEN = 0), in q's dtype, and DEN (the final one) kept as
                       the op's state.  Non-causal: only the normalisation.
    _bwd_prep_kernel   Gv = grad / den (input dtype), gden = -(grad.out) / den (fp32), 0 where den = 0.
    _q_sweep_kernel    grid (B*Hk, NP + 1, E / BLOCK_E), reverse order: the query state dST = sum_i phi_q^T Gv
                       and dz = sum_i gden_i phi_q(q_i) of the later chunks (non-causal: all queries first);
                       the keys of chunk c get DV += f phi_k dST and dphi_k = f (v dST^T + dz), then the tile VJP
                       into DK.
    _diag_bwd_kernel   causal, the diagonal blocks: dW = Gv v^T + gden, ds = dW P'(s) f mask scale, DQ += ds k,
                       DK += ds^T q, DV += W^T Gv (atomics for DK / DV: several query blocks and heads share keys).

Atomics are relaxed (only commutative fp32 adds inside a launch; launches are ordered).  The summation order
of the atomics is not fixed on a GPU: results are not bitwise reproducible there (they are under the interpreter).

Launches: forward 2 kernels (+ 2 memsets), backward 3-4 kernels (+ 3 memsets, the dtype casts of dq/dk/dv), no
per-chunk Python loop; grids depend on shapes only (usable under CUDA graphs).

Dtypes: q, k, v in bf16, fp16 or fp32; every dot reads operands in that dtype (fp32 -> ``_PREC``, tf32 by
default) and accumulates in fp32; states, NUM, DEN, DQ, DK, DV are fp32; the outputs and gradients come back in
the input dtype.  The on-chip states are cast to the input dtype for their dots (as flash-linear-attention does).

State between forward and backward: DEN [B, Hq, L] fp32 (``saved_state``; None -> recomputed by a forward).

Parallelism: B*Hk*(NP + 1)*(E / BLOCK_E) programs walk the sequence serially (88 at B = 1, H = 8, d = 64,
BLOCK_E = 64; 592 at d = Dv = 128), also when not causal; the diagonal kernels are flash-like (B*Hq*L / BLOCK_M
programs).  If the sweeps under-fill the GPU at small B*H, the non-causal key pass can be split over the sequence
(partial states summed) and the causal one turned into per-chunk states plus a prefix: not done.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["forward", "backward", "supported", "state_shape", "pair_count"]

T = 16           # tile of head-dim coordinates (a pair's feature block is T*T = 256 wide)
# rows per causal chunk (a multiple of BLOCK_M).  With the state passed on chip the sweeps cost the same at any
# CHUNK (each query reads the state once, each key updates it once); only the diagonal kernels grow with it
# (~L * CHUNK / 2 scores), so the smallest chunk is the cheapest in flops.  To measure: 64, 128, 256.
CHUNK = 64
BLOCK_M = 64     # query rows per block (sweeps and diagonal kernels)
BLOCK_N = 64     # key rows per block
BLOCK_E = 64     # value columns per sweep program (<= Dv; Dv = 128 -> two programs per pair)
SWEEP_WARPS = 8
DIAG_WARPS = 8
NUM_STAGES = 2
# tl.dot input precision for fp32 operands: "tf32" (default), "tf32x3" or "ieee".  bf16 / fp16 operands ignore it.
_PREC = os.environ.get("ALMOSTLINEAR_DOT_PRECISION", "tf32")
_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------- Triton helpers

@triton.jit
def _dot(a, b, DT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with both operands in DT (the input dtype), fp32 result.  UPCAST (interpreter only: numpy has no
    bf16 matmul): round to DT, then multiply in fp32 -- the same numbers a tensor-core dot gives."""
    a = a.to(DT)
    b = b.to(DT)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _pair(p, NT: tl.constexpr):
    """Tile pair (I, J), I <= J, of pair index p in [0, NT (NT + 1) / 2): rows a and NT-1-a of the upper
    triangle, (NT - a) + (a + 1) = NT + 1 pairs, fold into one row of a [NT / 2, NT + 1] rectangle."""
    if NT == 1:
        I = p * 0
        J = p * 0
    else:
        a = p // (NT + 1)
        r = p % (NT + 1)
        first = r < NT - a
        I = tl.where(first, a, NT - 1 - a)
        J = tl.where(first, a + r, r - 1)  # second row: J = (NT - 1 - a) + (r - (NT - a))
    return I, J


@triton.jit
def _program_start(p, c1s, c2s, D: tl.constexpr, T: tl.constexpr, BLOCK_E: tl.constexpr, LIN: tl.constexpr):
    """A sweep program's start: (kv head, value block, I, J, query-side weight, state [F, BLOCK_E] = 0,
    den vector [F] = 0, constant's state [BLOCK_E] = 0) for program p: a tile pair (weight c2 scale^2, doubled off
    the diagonal, F = T*T), or for LIN (p == NP) the linear part (weight c1 scale, F = D; I, J unused)."""
    if LIN:
        I = p * 0
        J = p * 0
        w = c1s + p * 0.0
    else:
        I, J = _pair(p, D // T)
        w = tl.where(I == J, c2s, 2.0 * c2s)
    F: tl.constexpr = D if LIN else T * T
    return (tl.program_id(0), tl.program_id(2), I, J, w, tl.zeros((F, BLOCK_E), dtype=tl.float32),
            tl.zeros((F,), dtype=tl.float32), tl.zeros((BLOCK_E,), dtype=tl.float32))


@triton.jit
def _tiles(X, rows, rm, I, J, D: tl.constexpr, T: tl.constexpr):
    """Tiles I and J of the rows `rows` of X ([N, D] row-major), fp32 [BLOCK, T] each (0 where not rm)."""
    t = tl.arange(0, T)
    base = X + rows[:, None] * D + t[None, :]
    a = tl.load(base + I * T, mask=rm[:, None], other=0.0).to(tl.float32)
    b = tl.load(base + J * T, mask=rm[:, None], other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _outer(a, b, BLOCK: tl.constexpr, T: tl.constexpr):
    """Row-wise a (x) b: [BLOCK, T] x [BLOCK, T] -> [BLOCK, T*T] (index a_index * T + b_index)."""
    return tl.reshape(a[:, :, None] * b[:, None, :], (BLOCK, T * T))


@triton.jit
def _outer_vjp(d, a, b, BLOCK: tl.constexpr, T: tl.constexpr):
    """d = dL/d(a (x) b) [BLOCK, T*T] -> (dL/da, dL/db), [BLOCK, T] each."""
    d3 = tl.reshape(d, (BLOCK, T, T))
    return tl.sum(d3 * b[:, None, :], 2), tl.sum(d3 * a[:, :, None], 1)


@triton.jit
def _key_weight(KW, bb, S, cols, cm, HAS_KW: tl.constexpr):
    """f_j for the keys `cols` of batch bb: the key weight (or 1), 0 past the end."""
    if HAS_KW:
        f = tl.load(KW + bb.to(tl.int64) * S + cols, mask=cm, other=0.0).to(tl.float32)
    else:
        f = cm.to(tl.float32)
    return f


# ----------------------------------------------------------------------- key-state sweep (forward and dq)

@triton.jit
def _kv_keys(K, V, KW, st, z, s0, z0, bkv, eb, Hk, S, lo, hi, I, J,
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
        f = _key_weight(KW, bkv // Hk, S, cols, cm, HAS_KW)
        fv = tl.load(Vh + cols[:, None] * E + e[None, :], mask=cm[:, None], other=0.0).to(tl.float32) * f[:, None]
        if LIN:
            x = tl.load(Kh + cols[:, None] * D + tl.arange(0, D)[None, :], mask=cm[:, None],
                        other=0.0).to(tl.float32)
            s0 += tl.sum(fv, 0)
            z0 += tl.sum(f, 0)
        else:
            a, b = _tiles(Kh, cols, cm, I, J, D, T)
            x = _outer(a, b, BLOCK_N, T)
        st += _dot(tl.trans(x), fv, DT, PREC, UPCAST)
        z += tl.sum(x * f[:, None], 0)
    return st, z, s0, z0


@triton.jit
def _kv_queries(Q, GV, GDEN, NUM, DEN, DQ, st, z, s0, z0, bkv, eb, G, L, lo, hi, I, J, w, c0, c1s,
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
                dphi = _dot(gv, tl.trans(st), DT, PREC, UPCAST)
                if eb == 0:
                    gd = tl.load(GDEN + qh * L + rows, mask=rm, other=0.0)
                    dphi += gd[:, None] * z[None, :]
                DQh = DQ + qh * L * D + rows[:, None] * D
                if LIN:
                    tl.atomic_add(DQh + d[None, :], dphi * c1s, mask=rm[:, None], sem="relaxed")
                else:
                    a, b = _tiles(Qh, rows, rm, I, J, D, T)
                    da, db = _outer_vjp(dphi * w, a, b, BLOCK_M, T)
                    tl.atomic_add(DQh + I * T + t[None, :], da, mask=rm[:, None], sem="relaxed")
                    tl.atomic_add(DQh + J * T + t[None, :], db, mask=rm[:, None], sem="relaxed")
            else:
                if LIN:
                    x = tl.load(Qh + rows[:, None] * D + d[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
                    x = x * c1s
                    acc = _dot(x, st, DT, PREC, UPCAST) + c0 * s0[None, :]
                else:
                    a, b = _tiles(Qh, rows, rm, I, J, D, T)
                    x = _outer(a, b, BLOCK_M, T) * w
                    acc = _dot(x, st, DT, PREC, UPCAST)
                tl.atomic_add(NUM + qh * L * E + rows[:, None] * E + e[None, :], acc, mask=rm[:, None], sem="relaxed")
                if eb == 0:
                    dn = tl.sum(x * z[None, :], 1)
                    if LIN:
                        dn += c0 * z0
                    tl.atomic_add(DEN + qh * L + rows, dn, mask=rm, sem="relaxed")


@triton.jit
def _kv_sweep(Q, K, V, KW, GV, GDEN, NUM, DEN, DQ, p, L, S, Hk, G, NC, c0, c1s, c2s,
              D: tl.constexpr, E: tl.constexpr, T: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr, HAS_KW: tl.constexpr,
              BWD: tl.constexpr, LIN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    bkv, eb, I, J, w, st, z, s0 = _program_start(p, c1s, c2s, D, T, BLOCK_E, LIN)
    z0 = tl.sum(s0, 0)
    if CAUSAL:
        for c in range(0, NC):
            lo = c * CHUNK
            if c > 0:
                _kv_queries(Q, GV, GDEN, NUM, DEN, DQ, st, z, s0, z0, bkv, eb, G, L, lo, tl.minimum(lo + CHUNK, L),
                            I, J, w, c0, c1s, D, E, T, BLOCK_M, BLOCK_E, BWD, LIN, PREC, UPCAST)
            st, z, s0, z0 = _kv_keys(K, V, KW, st, z, s0, z0, bkv, eb, Hk, S, lo, tl.minimum(lo + CHUNK, S), I, J,
                                     D, E, T, BLOCK_N, BLOCK_E, HAS_KW, LIN, PREC, UPCAST)
    else:
        st, z, s0, z0 = _kv_keys(K, V, KW, st, z, s0, z0, bkv, eb, Hk, S, 0, S, I, J,
                                 D, E, T, BLOCK_N, BLOCK_E, HAS_KW, LIN, PREC, UPCAST)
        _kv_queries(Q, GV, GDEN, NUM, DEN, DQ, st, z, s0, z0, bkv, eb, G, L, 0, L,
                    I, J, w, c0, c1s, D, E, T, BLOCK_M, BLOCK_E, BWD, LIN, PREC, UPCAST)


@triton.jit
def _kv_sweep_kernel(Q, K, V, KW, GV, GDEN, NUM, DEN, DQ, L, S, Hk, G, NC, c0, c1s, c2s,
                     D: tl.constexpr, E: tl.constexpr, T: tl.constexpr, NP: tl.constexpr, CHUNK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_KW: tl.constexpr, BWD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """grid (B*Hk, NP + 1, E / BLOCK_E): program (kv head, pair p, value block); p == NP is the linear and
    constant part."""
    p = tl.program_id(1)
    if p < NP:
        _kv_sweep(Q, K, V, KW, GV, GDEN, NUM, DEN, DQ, p, L, S, Hk, G, NC, c0, c1s, c2s, D, E, T, CHUNK, BLOCK_M,
                  BLOCK_N, BLOCK_E, CAUSAL, HAS_KW, BWD, False, PREC, UPCAST)
    else:
        _kv_sweep(Q, K, V, KW, GV, GDEN, NUM, DEN, DQ, p, L, S, Hk, G, NC, c0, c1s, c2s, D, E, T, CHUNK, BLOCK_M,
                  BLOCK_N, BLOCK_E, CAUSAL, HAS_KW, BWD, True, PREC, UPCAST)


# ------------------------------------------------------------------------- query-state sweep (dk and dv)

@triton.jit
def _q_queries(Q, GV, GDEN, dst, dz, ds0, bkv, eb, G, L, lo, hi, I, J, w, c0, c1s,
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
                a, b = _tiles(Qh, rows, rm, I, J, D, T)
                x = _outer(a, b, BLOCK_M, T) * w
            dst += _dot(tl.trans(x), gv, DT, PREC, UPCAST)
            dz += tl.sum(x * gd[:, None], 0)
    return dst, dz, ds0


@triton.jit
def _q_keys(K, V, KW, DK, DV, dst, dz, ds0, bkv, eb, Hk, S, lo, hi, I, J,
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
        f = _key_weight(KW, bkv // Hk, S, cols, cm, HAS_KW)
        v = tl.load(V + kh * S * E + cols[:, None] * E + e[None, :], mask=cm[:, None], other=0.0)
        dphi = _dot(v, tl.trans(dst), DT, PREC, UPCAST)
        if eb == 0:
            dphi += dz[None, :]
        dphi = dphi * f[:, None]
        DKh = DK + kh * S * D + cols[:, None] * D
        if LIN:
            x = tl.load(Kh + cols[:, None] * D + d[None, :], mask=cm[:, None], other=0.0).to(tl.float32)
            dv = _dot(x, dst, DT, PREC, UPCAST) + ds0[None, :]
            tl.atomic_add(DKh + d[None, :], dphi, mask=cm[:, None], sem="relaxed")
        else:
            a, b = _tiles(Kh, cols, cm, I, J, D, T)
            dv = _dot(_outer(a, b, BLOCK_N, T), dst, DT, PREC, UPCAST)
            da, db = _outer_vjp(dphi, a, b, BLOCK_N, T)
            tl.atomic_add(DKh + I * T + t[None, :], da, mask=cm[:, None], sem="relaxed")
            tl.atomic_add(DKh + J * T + t[None, :], db, mask=cm[:, None], sem="relaxed")
        tl.atomic_add(DV + kh * S * E + cols[:, None] * E + e[None, :], dv * f[:, None], mask=cm[:, None],
                      sem="relaxed")


@triton.jit
def _q_sweep(Q, K, V, KW, GV, GDEN, DK, DV, p, L, S, Hk, G, NC, c0, c1s, c2s,
             D: tl.constexpr, E: tl.constexpr, T: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr, HAS_KW: tl.constexpr,
             LIN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    bkv, eb, I, J, w, dst, dz, ds0 = _program_start(p, c1s, c2s, D, T, BLOCK_E, LIN)
    if CAUSAL:
        for cc in range(0, NC):
            lo = (NC - 1 - cc) * CHUNK
            if cc > 0:
                _q_keys(K, V, KW, DK, DV, dst, dz, ds0, bkv, eb, Hk, S, lo, tl.minimum(lo + CHUNK, S), I, J,
                        D, E, T, BLOCK_N, BLOCK_E, HAS_KW, LIN, PREC, UPCAST)
            dst, dz, ds0 = _q_queries(Q, GV, GDEN, dst, dz, ds0, bkv, eb, G, L, lo, tl.minimum(lo + CHUNK, L),
                                      I, J, w, c0, c1s, D, E, T, BLOCK_M, BLOCK_E, LIN, PREC, UPCAST)
    else:
        dst, dz, ds0 = _q_queries(Q, GV, GDEN, dst, dz, ds0, bkv, eb, G, L, 0, L,
                                  I, J, w, c0, c1s, D, E, T, BLOCK_M, BLOCK_E, LIN, PREC, UPCAST)
        _q_keys(K, V, KW, DK, DV, dst, dz, ds0, bkv, eb, Hk, S, 0, S, I, J,
                D, E, T, BLOCK_N, BLOCK_E, HAS_KW, LIN, PREC, UPCAST)


@triton.jit
def _q_sweep_kernel(Q, K, V, KW, GV, GDEN, DK, DV, L, S, Hk, G, NC, c0, c1s, c2s,
                    D: tl.constexpr, E: tl.constexpr, T: tl.constexpr, NP: tl.constexpr, CHUNK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_KW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """grid (B*Hk, NP + 1, E / BLOCK_E), like :func:`_kv_sweep_kernel`, walking the chunks in reverse."""
    p = tl.program_id(1)
    if p < NP:
        _q_sweep(Q, K, V, KW, GV, GDEN, DK, DV, p, L, S, Hk, G, NC, c0, c1s, c2s, D, E, T, CHUNK, BLOCK_M,
                 BLOCK_N, BLOCK_E, CAUSAL, HAS_KW, False, PREC, UPCAST)
    else:
        _q_sweep(Q, K, V, KW, GV, GDEN, DK, DV, p, L, S, Hk, G, NC, c0, c1s, c2s, D, E, T, CHUNK, BLOCK_M,
                 BLOCK_N, BLOCK_E, CAUSAL, HAS_KW, True, PREC, UPCAST)


# ---------------------------------------------------------------------------- diagonal (intra-chunk) blocks

@triton.jit
def _diag_block(q, K, V, KW, bb, kh, S, rows, n0, hi, scale, c0, c1, c2, D: tl.constexpr, E: tl.constexpr,
                BLOCK_N: tl.constexpr, HAS_KW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Keys n0..n0+BLOCK_N (below hi) of kv head kh against the query rows q: (k, v, s = scale q.k, f, allowed,
    W = P(s) f on the allowed causal entries, else 0)."""
    DT = K.dtype.element_ty
    d = tl.arange(0, D)
    cols = n0 + tl.arange(0, BLOCK_N)
    cm = cols < hi
    f = _key_weight(KW, bb, S, cols, cm, HAS_KW)
    k = tl.load(K + kh * S * D + cols[:, None] * D + d[None, :], mask=cm[:, None], other=0.0)
    v = tl.load(V + kh * S * E + cols[:, None] * E + tl.arange(0, E)[None, :], mask=cm[:, None], other=0.0)
    s = _dot(q, tl.trans(k), DT, PREC, UPCAST) * scale
    ok = (cols[None, :] <= rows[:, None]) & cm[None, :]
    W = tl.where(ok, (c0 + s * (c1 + c2 * s)) * f[None, :], 0.0)
    return k, v, s, f, ok, W


@triton.jit
def _diag_fwd_kernel(Q, K, V, KW, NUM, DEN, OUT, L, S, Hq, G, scale, c0, c1, c2,
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
            _, v, _, _, _, W = _diag_block(q, K, V, KW, qh // Hq, kh, S, rows, n0, hi, scale, c0, c1, c2, D, E,
                                           BLOCK_N, HAS_KW, PREC, UPCAST)
            num += _dot(W, v, DT, PREC, UPCAST)
            den += tl.sum(W, 1)
        tl.store(DEN + qh * L + rows, den, mask=rm)
    pos = den > 0
    out = tl.where(pos[:, None], num / tl.where(pos, den, 1.0)[:, None], 0.0)
    tl.store(OUT + qh * L * E + rows[:, None] * E + ev[None, :], out.to(OUT.dtype.element_ty), mask=rm[:, None])


@triton.jit
def _bwd_prep_kernel(GRAD, OUT, DEN, GV, GDEN, L, E: tl.constexpr, BLOCK_M: tl.constexpr):
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
def _diag_bwd_kernel(Q, K, V, KW, GV, GDEN, DQ, DK, DV, L, S, Hq, G, scale, c0, c1, c2,
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
        k, v, s, f, ok, W = _diag_block(q, K, V, KW, qh // Hq, kh, S, rows, n0, hi, scale, c0, c1, c2, D, E,
                                        BLOCK_N, HAS_KW, PREC, UPCAST)
        cols = n0 + tl.arange(0, BLOCK_N)
        cm = cols < hi
        dW = _dot(gv, tl.trans(v), DT, PREC, UPCAST) + gd[:, None]
        ds = tl.where(ok, dW * (c1 + 2.0 * c2 * s) * f[None, :], 0.0) * scale
        dq += _dot(ds, k, DT, PREC, UPCAST)
        tl.atomic_add(DK + kh * S * D + cols[:, None] * D + d[None, :], _dot(tl.trans(ds), q, DT, PREC, UPCAST),
                      mask=cm[:, None], sem="relaxed")
        tl.atomic_add(DV + kh * S * E + cols[:, None] * E + ev[None, :], _dot(tl.trans(W), gv, DT, PREC, UPCAST),
                      mask=cm[:, None], sem="relaxed")
    tl.atomic_add(DQ + qh * L * D + rows[:, None] * D + d[None, :], dq, mask=rm[:, None], sem="relaxed")


# ------------------------------------------------------------------------------------------------ launchers

def pair_count(D: int) -> int:
    """Tile pairs I <= J at head dim D (tiles of T): 1, 3, 10, 36 for D = 16, 32, 64, 128."""
    nt = D // T
    return nt * (nt + 1) // 2


def state_shape(B: int, Hq: int, L: int) -> tuple:
    """Shape of the state :func:`forward` returns (the denominator, fp32)."""
    return (B, Hq, L)


def supported(q, v, key_weight=None, alibi=None, window=0, degree=2) -> bool:
    """Whether these kernels cover the call: degree 2, no ALiBi, no window, D and Dv in {16, 32, 64, 128}, fp32 /
    bf16 / fp16, a CUDA tensor (or any device under TRITON_INTERPRET=1).  key_weight: any [B, S] weight."""
    if degree != 2 or alibi is not None or window:
        return False
    if q.shape[-1] not in _DIMS or v.shape[-1] not in _DIMS or q.dtype not in _DTYPES:
        return False
    if key_weight is not None and key_weight.shape != (q.shape[0], v.shape[-2]):
        return False
    return bool(q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


class _Call:
    """Shapes, contiguous operands, coefficients and launch constants of one call (module constants read now,
    so tests can shrink CHUNK / BLOCK_* before a call)."""

    def __init__(self, q, k, v, key_weight, scale, coeffs, causal):
        if len(coeffs) != 3:
            raise ValueError(f"degree-2 kernels need 3 coefficients, got {len(coeffs)}")
        self.B, self.Hq, self.L, self.D = q.shape
        self.Hk, self.S, self.E = k.shape[1], k.shape[2], v.shape[-1]
        if self.Hq % self.Hk or self.D % T or self.D < 16 or self.E < 16 or self.E & (self.E - 1):
            raise ValueError(f"unsupported shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        self.G = self.Hq // self.Hk
        self.dtype = q.dtype
        self.q, self.k, self.v = q.contiguous(), k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
        self.has_kw = key_weight is not None
        self.kw = key_weight.to(torch.float32).contiguous() if self.has_kw else self.q
        c0, c1, c2 = (float(c) for c in coeffs)
        self.scale, self.c0, self.c1, self.c2 = float(scale), c0, c1, c2
        self.c1s, self.c2s = c1 * self.scale, c2 * self.scale ** 2
        self.causal = bool(causal)
        self.chunk, self.bm, self.bn = CHUNK, BLOCK_M, BLOCK_N
        if self.chunk % self.bm:
            raise ValueError(f"CHUNK {self.chunk} must be a multiple of BLOCK_M {self.bm}")
        self.be = min(BLOCK_E, self.E)
        self.nc = triton.cdiv(self.L, self.chunk) if self.causal else 1
        self.np = pair_count(self.D)
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        self.upcast = interp and q.dtype != torch.float32
        self.common = dict(PREC=_PREC, UPCAST=self.upcast)

    def sweep_grid(self):
        return (self.B * self.Hk, self.np + 1, self.E // self.be)

    def row_grid(self):
        return (self.B * self.Hq, triton.cdiv(self.L, self.bm))

    def sweep_consts(self):
        return dict(D=self.D, E=self.E, T=T, NP=self.np, CHUNK=self.chunk, BLOCK_M=self.bm, BLOCK_N=self.bn,
                    BLOCK_E=self.be, CAUSAL=self.causal, HAS_KW=self.has_kw, num_warps=SWEEP_WARPS,
                    num_stages=NUM_STAGES, **self.common)

    def f32(self, *shape):
        return torch.zeros(*shape, device=self.q.device, dtype=torch.float32)


def _forward(c: _Call):
    B, Hq, L, E = c.B, c.Hq, c.L, c.E
    num, den = c.f32(B, Hq, L, E), c.f32(B, Hq, L)
    out = torch.empty(B, Hq, L, E, device=c.q.device, dtype=c.dtype)
    if L == 0:
        return out, den
    _kv_sweep_kernel[c.sweep_grid()](c.q, c.k, c.v, c.kw, num, den, num, den, num, L, c.S, c.Hk, c.G, c.nc,
                                     c.c0, c.c1s, c.c2s, BWD=False, **c.sweep_consts())
    _diag_fwd_kernel[c.row_grid()](c.q, c.k, c.v, c.kw, num, den, out, L, c.S, Hq, c.G, c.scale, c.c0, c.c1, c.c2,
                                   D=c.D, E=E, CHUNK=c.chunk, BLOCK_M=c.bm, BLOCK_N=c.bn, CAUSAL=c.causal,
                                   HAS_KW=c.has_kw, num_warps=DIAG_WARPS, num_stages=NUM_STAGES, **c.common)
    return out, den


# --------------------------------------------------------------------------------------------- public functions

def forward(q, k, v, key_weight=None, *, scale, coeffs, causal=False):
    """q [B, Hq, L, D], k [B, Hk, S, D], v [B, Hk, S, Dv] (bf16 / fp16 / fp32), key_weight [B, S] or None
    -> (out [B, Hq, L, Dv] in q's dtype, den [B, Hq, L] fp32: the state :func:`backward` reuses)."""
    return _forward(_Call(q, k, v, key_weight, scale, coeffs, causal))


def backward(grad, q, k, v, out, key_weight=None, *, scale, coeffs, causal=False, saved_state=None):
    """Analytic backward -> (dq, dk, dv) in the inputs' dtypes.  saved_state: the forward's den (None:
    recomputed by a forward pass)."""
    c = _Call(q, k, v, key_weight, scale, coeffs, causal)
    B, Hq, L, E = c.B, c.Hq, c.L, c.E
    dq, dk, dv = c.f32(B, Hq, L, c.D), c.f32(B, c.Hk, c.S, c.D), c.f32(B, c.Hk, c.S, E)
    if L and c.S:
        den = saved_state if saved_state is not None else _forward(c)[1]
        den = den.to(torch.float32).contiguous()
        gv = torch.empty(B, Hq, L, E, device=c.q.device, dtype=c.dtype)
        gden = torch.empty(B, Hq, L, device=c.q.device, dtype=torch.float32)
        _bwd_prep_kernel[c.row_grid()](grad.contiguous(), out.contiguous(), den, gv, gden, L, E=E, BLOCK_M=c.bm,
                                       num_warps=DIAG_WARPS)
        _kv_sweep_kernel[c.sweep_grid()](c.q, c.k, c.v, c.kw, gv, gden, gden, gden, dq, L, c.S, c.Hk, c.G, c.nc,
                                         c.c0, c.c1s, c.c2s, BWD=True, **c.sweep_consts())
        _q_sweep_kernel[c.sweep_grid()](c.q, c.k, c.v, c.kw, gv, gden, dk, dv, L, c.S, c.Hk, c.G, c.nc,
                                        c.c0, c.c1s, c.c2s, **c.sweep_consts())
        if c.causal:
            _diag_bwd_kernel[c.row_grid()](c.q, c.k, c.v, c.kw, gv, gden, dq, dk, dv, L, c.S, Hq, c.G, c.scale,
                                           c.c0, c.c1, c.c2, D=c.D, E=E, CHUNK=c.chunk, BLOCK_M=c.bm,
                                           BLOCK_N=c.bn, HAS_KW=c.has_kw, num_warps=DIAG_WARPS,
                                           num_stages=NUM_STAGES, **c.common)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
