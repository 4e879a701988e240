"""Triton kernels for degree-2 polynomial attention (CUDA; also runs under TRITON_INTERPRET=1 on CPU).

Covers degree 2, D and Dv in {16, 32, 64, 128}, mask kinds none / causal / key_padding /
causal+key_padding (key_weight).  ALiBi, window and degree > 2 use the torch path (kernels/cpu/), also on
CUDA (see op.py's dispatch).

Features on the GPU use the full square (x' = w x; phi2 = x' (x')^T, rank D^2, no packing: the kernels
expand a [BLOCK, D] row block of phi in registers per a-index and feed tensor-core dots; accumulation fp32).
The three kernels do all the rank-D^2 work; the constant/linear feature blocks and the denominator
(z2 = sum_j f_j k_j k_j^T is only D x D) are small torch matmuls:

    _state_kernel  ST[c] = sum_{rows in chunk c} phi2(x_i)^T Y_i          [D*D, E] per chunk
    _apply_kernel  OUT_i = phi2(x_i) ST[c(i)]                               [E] per row
    _vjp_kernel    DX_i  = J_phi2(x_i)^T (Y_i ST[c(i)]^T) = 2 w sum_a (Y_i ST[a]^T) x'_a

Causal: chunks of CHUNK rows; per-chunk states are written shifted (store index c*mul + add) and prefix-summed
in place (torch.cumsum_), so chunk c reads the sum over chunks < c (forward) or > c (backward, reversed
order); inside a chunk P(s) is applied directly to the C x C score block (torch, batched over chunks).
Memory: NC * D^2 * Dv * 4 bytes per (batch, head) for the causal states.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..features import evaluate_polynomial, evaluate_polynomial_derivative

CHUNK = 128
SPLIT = 1024  # non-causal: rows per partial state (parallelism over the sequence), summed afterwards
BLOCK = 32 if os.environ.get("TRITON_INTERPRET") == "1" else 64
# tl.dot input precision for fp32 operands: "tf32" (default; ~3e-4 relative error on H200, far below the
# approximation's own error), "tf32x3" (fp32-accurate, ~1.5-2.5x slower) or "ieee".
_PREC = os.environ.get("ALMOSTLINEAR_DOT_PRECISION", "tf32")
_TINY = 1e-30


@triton.jit
def _state_kernel(X, XT, Y, ST, N, C, NC, w, smul, sadd, sxb, sxn, stb, syb, syn, ssb, ssc,
                  D: tl.constexpr, E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                  PREC: tl.constexpr):
    pid = tl.program_id(0)
    a = tl.program_id(1)
    eb = tl.program_id(2)
    bh = pid // NC
    c = pid % NC
    idx = c * smul + sadd
    if (idx >= 0) & (idx < NC):
        d = tl.arange(0, D)
        e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
        acc = tl.zeros((D, BLOCK_E), dtype=tl.float32)
        start = c * C
        end = tl.minimum(start + C, N)
        for n0 in range(start, end, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            m = rows < end
            xb = tl.load(X + bh * sxb + rows[:, None] * sxn + d[None, :], mask=m[:, None], other=0.0)
            xa = tl.load(XT + bh * stb + a * N + rows, mask=m, other=0.0)
            yb = tl.load(Y + bh * syb + rows[:, None] * syn + e[None, :], mask=m[:, None], other=0.0)
            ph = xb * (xa * (w * w))[:, None]
            acc += tl.dot(tl.trans(ph), yb, input_precision=PREC)
        tl.store(ST + bh * ssb + idx * ssc + (a * D + d)[:, None] * E + e[None, :], acc)


@triton.jit
def _row_block(mb, N, C, lmul, ladd, BLOCK_M: tl.constexpr):
    """Rows of block mb, their mask, and the index of the chunk state they read (c * lmul + ladd)."""
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, rows < N, ((mb * BLOCK_M) // C) * lmul + ladd


@triton.jit
def _apply_kernel(X, XT, ST, OUT, N, C, NC, w, lmul, ladd, GRP, sxb, sxn, stb, ssb, ssc, sob, son,
                  D: tl.constexpr, E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                  PREC: tl.constexpr):
    bh = tl.program_id(0)
    mb = tl.program_id(1)
    eb = tl.program_id(2)
    rows, m, idx = _row_block(mb, N, C, lmul, ladd, BLOCK_M)
    sbh = bh // GRP  # batch-major heads: q head b*Hq + h reads kv head b*Hk + h // G
    d = tl.arange(0, D)
    e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
    xb = tl.load(X + bh * sxb + rows[:, None] * sxn + d[None, :], mask=m[:, None], other=0.0) * w
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    if (idx >= 0) & (idx < NC):
        for a in range(D):
            xa = tl.load(XT + bh * stb + a * N + rows, mask=m, other=0.0) * w
            sb = tl.load(ST + sbh * ssb + idx * ssc + (a * D + d)[:, None] * E + e[None, :])
            acc += tl.dot(xb * xa[:, None], sb, input_precision=PREC)
    tl.store(OUT + bh * sob + rows[:, None] * son + e[None, :], acc, mask=m[:, None])


@triton.jit
def _vjp_kernel(X, XT, Y, ST, DX, N, C, NC, w, lmul, ladd, GRP, sxb, sxn, stb, syb, syn, ssb, ssc, sdb, sdn,
                D: tl.constexpr, E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                PREC: tl.constexpr):
    bh = tl.program_id(0)
    mb = tl.program_id(1)
    rows, m, idx = _row_block(mb, N, C, lmul, ladd, BLOCK_M)
    sbh = bh // GRP
    d = tl.arange(0, D)
    dx = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    if (idx >= 0) & (idx < NC):
        for a in range(D):
            xa = tl.load(XT + bh * stb + a * N + rows, mask=m, other=0.0) * w
            t = tl.zeros((BLOCK_M, D), dtype=tl.float32)
            for e0 in range(0, E, BLOCK_E):
                e = e0 + tl.arange(0, BLOCK_E)
                yb = tl.load(Y + bh * syb + rows[:, None] * syn + e[None, :], mask=m[:, None], other=0.0)
                sb = tl.load(ST + sbh * ssb + idx * ssc + (a * D + d)[:, None] * E + e[None, :])
                t += tl.dot(yb, tl.trans(sb), input_precision=PREC)  # t[i, b] = dphi_i[(a, b)]
            dx += t * xa[:, None]
    tl.store(DX + bh * sdb + rows[:, None] * sdn + d[None, :], dx * (2.0 * w), mask=m[:, None])


# ---------------------------------------------------------------- launchers (x: [BH, N, D] contiguous fp32)

def _cfg(D, E):
    be = min(E, 64)
    return be, dict(num_warps=8 if max(D, E) >= 128 else 4, num_stages=1 if max(D, E) >= 128 else 2)


def state(x, y, w, chunk, nc, smul=1, sadd=0):
    """Per-chunk sum phi2(x)^T y -> [BH, nc, D*D, E] (chunks stored at c*smul + sadd; others zero)."""
    BH, N, D = x.shape
    E = y.shape[-1]
    xt = x.transpose(1, 2).contiguous()
    st = torch.zeros(BH, nc, D * D, E, device=x.device, dtype=torch.float32)
    be, kw = _cfg(D, E)
    _state_kernel[(BH * nc, D, E // be)](x, xt, y, st, N, chunk, nc, float(w), smul, sadd, x.stride(0),
                                         x.stride(1), xt.stride(0), y.stride(0), y.stride(1), st.stride(0),
                                         st.stride(1), D=D, E=E, BLOCK_N=BLOCK, BLOCK_E=be, PREC=_PREC, **kw)
    return st


def global_state(x, y, w):
    """Non-causal sum_i phi2(x_i)^T y_i -> [BH, 1, D*D, E]: partial states over SPLIT rows, then summed."""
    n = x.shape[1]
    nc = max(1, triton.cdiv(n, SPLIT))
    st = state(x, y, w, SPLIT, nc)
    return st if nc == 1 else st.sum(1, keepdim=True)


def apply(x, st, w, chunk, lmul=1, ladd=0):
    """phi2(x_i) st[c(i)] -> [BH, N, E]; x heads map to state heads by GQA grouping (batch-major)."""
    BH, N, D = x.shape
    BS, nc, _, E = st.shape
    xt = x.transpose(1, 2).contiguous()
    out = torch.empty(BH, N, E, device=x.device, dtype=torch.float32)
    be, kw = _cfg(D, E)
    _apply_kernel[(BH, triton.cdiv(N, BLOCK), E // be)](x, xt, st, out, N, chunk, nc, float(w), lmul, ladd,
                                                        BH // BS, x.stride(0), x.stride(1), xt.stride(0),
                                                        st.stride(0), st.stride(1), out.stride(0), out.stride(1),
                                                        D=D, E=E, BLOCK_M=BLOCK, BLOCK_E=be, PREC=_PREC, **kw)
    return out


def vjp(x, y, st, w, chunk, lmul=1, ladd=0):
    """J_phi2(x_i)^T (y_i st[c(i)]^T) -> [BH, N, D]."""
    BH, N, D = x.shape
    BS, nc, _, E = st.shape
    xt = x.transpose(1, 2).contiguous()
    dx = torch.empty(BH, N, D, device=x.device, dtype=torch.float32)
    be, kw = _cfg(D, E)
    _vjp_kernel[(BH, triton.cdiv(N, BLOCK))](x, xt, y, st, dx, N, chunk, nc, float(w), lmul, ladd, BH // BS,
                                             x.stride(0), x.stride(1), xt.stride(0), y.stride(0), y.stride(1),
                                             st.stride(0), st.stride(1), dx.stride(0), dx.stride(1), D=D, E=E,
                                             BLOCK_M=BLOCK, BLOCK_E=be, PREC=_PREC, **kw)
    return dx


# ---------------------------------------------------------------- forward / backward


class _Setup:
    def __init__(self, q, k, v, key_weight, scale, coeffs, causal):
        self.B, self.Hq, self.L, self.D = q.shape
        self.Hk, self.S, self.Dv = k.shape[1], k.shape[2], v.shape[-1]
        self.G = self.Hq // self.Hk
        c0, c1, c2 = coeffs
        self.c0, self.c1s, self.w2, self.scale, self.coeffs = c0, c1 * scale, math.sqrt(c2) * scale, scale, coeffs
        self.causal = causal
        self.chunk = CHUNK if causal else max(self.L, self.S, 1)
        self.nc = (self.S + self.chunk - 1) // self.chunk if causal else 1
        self.q3 = q.reshape(self.B * self.Hq, self.L, self.D)
        self.k3 = k.reshape(self.B * self.Hk, self.S, self.D)
        self.f = (key_weight.to(q.dtype)[:, None, :, None].expand(self.B, self.Hk, self.S, 1)
                  if key_weight is not None else None)
        self.X = v if self.f is None else v * self.f  # [B, Hk, S, Dv]
        self.fk = k if self.f is None else k * self.f

    # small per-chunk states (linear / constant / denominator parts), [B, Hk, NC, ...]
    def chunks(self, t, n):
        pad = self.nc * self.chunk - n
        if pad:
            t = torch.nn.functional.pad(t, (0, 0, 0, pad))
        return t.reshape(*t.shape[:-2], self.nc, self.chunk, t.shape[-1])

    def prefix(self, st, reverse=False):
        """per-chunk [.., NC, ...] -> exclusive prefix (reverse: suffix) sums over chunks."""
        if not self.causal:
            return st
        if reverse:
            st = st.flip(2)
        out = _exclusive(st)
        return out.flip(2) if reverse else out


def _exclusive(st):
    out = torch.zeros_like(st)
    out[:, :, 1:] = torch.cumsum(st[:, :, :-1], 2)
    return out


def _small_states(s, keys, X):
    """S1 [B,Hk,NC,D,Dv], S0 [B,Hk,NC,Dv], z2 [B,Hk,NC,D,D], z1 [B,Hk,NC,D], z0 [B,Hk,NC] (exclusive prefix)."""
    kc = s.chunks(keys, s.S)
    fkc = s.chunks(s.fk, s.S)
    Xc = s.chunks(X, s.S)
    S1 = kc.transpose(-1, -2) @ Xc
    S0 = Xc.sum(-2)
    z2 = fkc.transpose(-1, -2) @ kc
    z1 = fkc.sum(-2)
    fc = s.chunks(s.f if s.f is not None else torch.ones_like(keys[..., :1]), s.S)
    z0 = fc.sum((-2, -1))
    return [s.prefix(t) for t in (S1, S0, z2, z1, z0)]


def _q_view(s, t):
    """[B, Hq, L, X] -> [B, Hk, NC, G*C, X] (chunk-major, heads of a group together)."""
    B, Hk, G = s.B, s.Hk, s.G
    tc = s.chunks(t, s.L)  # [B, Hq, NC, C, X]
    tc = tc.reshape(B, Hk, G, s.nc, s.chunk, -1).transpose(2, 3)
    return tc.reshape(B, Hk, s.nc, G * s.chunk, -1)


def _q_unview(s, t):
    B, Hk, G = s.B, s.Hk, s.G
    t = t.reshape(B, Hk, s.nc, G, s.chunk, -1).transpose(2, 3).reshape(B, s.Hq, s.nc * s.chunk, -1)
    return t[:, :, :s.L]


def _intra(s, q, k, v):
    """Causal intra-chunk blocks: s_blk, W (with tril and key weights) [B, Hk, NC, G*C, C]."""
    qv = _q_view(s, q)
    kc, vc = s.chunks(k, s.S), s.chunks(v, s.S)
    sc = (qv @ kc.transpose(-1, -2)) * s.scale
    i = torch.arange(s.chunk, device=q.device)
    tril = (i[None, :] <= i[:, None]).to(q.dtype).repeat(s.G, 1)
    M = tril
    if s.f is not None:
        M = M * s.chunks(s.f, s.S).transpose(-1, -2)
    return qv, kc, vc, sc, evaluate_polynomial(sc, s.coeffs) * M, M


def _key_state(s):
    """phi2(K)^T X: causal -> exclusive prefix over chunks [B*Hk, NC, D*D, Dv]; else global [B*Hk, 1, ...]."""
    X3 = s.X.reshape(s.B * s.Hk, s.S, s.Dv)
    if not s.causal:
        return global_state(s.k3, X3, 1.0)
    st = state(s.k3, X3, 1.0, s.chunk, s.nc, 1, 1)
    return st.cumsum_(1)


def _state_shapes(B, Hk, D, Dv):
    """S2 [B*Hk, 1, D*D, Dv], S1 [B, Hk, 1, D, Dv], S0 [B, Hk, 1, Dv], z2 [B, Hk, 1, D, D], z1 [B, Hk, 1, D],
    z0 [B, Hk, 1]: the non-causal states, concatenated flat in this order by :func:`forward`."""
    return [(B * Hk, 1, D * D, Dv), (B, Hk, 1, D, Dv), (B, Hk, 1, Dv), (B, Hk, 1, D, D), (B, Hk, 1, D), (B, Hk, 1)]


def state_size(B, Hk, D, Dv) -> int:
    """Length of the flat non-causal state :func:`forward` returns."""
    return sum(math.prod(sh) for sh in _state_shapes(B, Hk, D, Dv))


def _unpack_state(flat, s):
    shapes = _state_shapes(s.B, s.Hk, s.D, s.Dv)
    parts = flat.split([math.prod(sh) for sh in shapes])
    return [p.view(sh) for p, sh in zip(parts, shapes)]


def forward(q, k, v, key_weight=None, *, scale, coeffs, causal=False):
    """q [B, Hq, L, D], k [B, Hk, S, D], v [B, Hk, S, Dv] fp32 contiguous -> out [B, Hq, L, Dv] fp32 and, when
    not causal, the flat state (see :func:`state_size`) that :func:`backward` can reuse (None when causal)."""
    out, _, states = _forward(q, k, v, key_weight, scale, coeffs, causal)
    return out, None if causal else torch.cat([t.reshape(-1) for t in states])


def _forward(q, k, v, key_weight, scale, coeffs, causal):
    s = _Setup(q, k, v, key_weight, scale, coeffs, causal)
    B, Hq, L, Dv = s.B, s.Hq, s.L, s.Dv
    S2 = _key_state(s)
    S1, S0, z2, z1, z0 = _small_states(s, k, s.X)
    num = apply(s.q3, S2, s.w2, s.chunk).view(B, Hq, L, Dv)
    qv = _q_view(s, q)  # [B, Hk, NC, G*C, D]
    lin = s.c1s * (qv @ S1) + s.c0 * S0.unsqueeze(-2)
    W = None
    if causal:
        _, _, vc, _, W, _ = _intra(s, q, k, v)
        lin = lin + W @ vc
    _, den, inv = _denominator(s, qv, z2, z1, z0, W)
    num = num + _q_unview(s, lin)
    return num * inv.unsqueeze(-1), den, (S2, S1, S0, z2, z1, z0)


def _denominator(s, qv, z2, z1, z0, W):
    """(qz = qv z2, den [B, Hq, L], 1 / den (0 where den = 0)): den from the small states plus, when causal, the
    intra-chunk weights W."""
    qz = qv @ z2
    den = (s.w2 ** 2) * (qz * qv).sum(-1) + s.c1s * (qv @ z1.unsqueeze(-1)).squeeze(-1) + s.c0 * z0.unsqueeze(-1)
    if W is not None:
        den = den + W.sum(-1)
    den = _q_unview(s, den.unsqueeze(-1)).squeeze(-1)
    return qz, den, torch.where(den > _TINY, 1.0 / den.clamp_min(_TINY), torch.zeros_like(den))


def backward(grad, q, k, v, out, key_weight=None, *, scale, coeffs, causal=False, saved_state=None):
    """Analytic backward; returns dq, dk, dv (fp32).  saved_state: the forward's flat non-causal state (else
    the states are recomputed)."""
    s = _Setup(q, k, v, key_weight, scale, coeffs, causal)
    B, Hq, Hk, L, S, D, Dv, G = s.B, s.Hq, s.Hk, s.L, s.S, s.D, s.Dv, s.G
    if saved_state is not None and not causal:
        S2, S1, S0, z2, z1, z0 = _unpack_state(saved_state, s)
    else:  # recompute the states
        S2 = _key_state(s)
        S1, S0, z2, z1, z0 = _small_states(s, k, s.X)
    qv = _q_view(s, q)
    W = None
    if causal:
        _, kc2, vc, sc, W, M = _intra(s, q, k, v)
    qz, _, inv = _denominator(s, qv, z2, z1, z0, W)
    gn = grad * inv.unsqueeze(-1)                       # G / den
    gz = -(grad * out).sum(-1) * inv                    # -Delta / den
    gnv, gzv = _q_view(s, gn), _q_view(s, gz.unsqueeze(-1))  # [B, Hk, NC, G*C, Dv | 1]
    # dq: value part (kernel + linear) and denominator part
    dq = vjp(s.q3, gn.reshape(B * Hq, L, Dv), S2, s.w2, s.chunk).view(B, Hq, L, D)
    dqs = s.c1s * (gnv @ S1.transpose(-1, -2)) + gzv * (2 * s.w2 ** 2 * qz + s.c1s * z1.unsqueeze(-2))
    # suffix states of the query side: dS2 (kernel), dS1, dS0, dz2, dz1, dz0
    g3 = gn.reshape(B * Hq, L, Dv)
    dS2 = state(s.q3, g3, s.w2, s.chunk, s.nc, -1, s.nc) if causal else global_state(s.q3, g3, s.w2)
    if G > 1:
        dS2 = dS2.view(B, Hk, G, s.nc, D * D, Dv).sum(2).view(B * Hk, s.nc, D * D, Dv)
    if causal:
        dS2.cumsum_(1)  # stored reversed: index NC-1-c holds the sum over chunks > c
    dS1 = s.prefix(s.c1s * (qv.transpose(-1, -2) @ gnv), reverse=True)
    dS0 = s.prefix(s.c0 * gnv.sum(-2), reverse=True)
    dz2 = s.prefix((s.w2 ** 2) * (qv.transpose(-1, -2) @ (gzv * qv)), reverse=True)
    dz1 = s.prefix(s.c1s * (gzv * qv).sum(-2), reverse=True)
    # (z0 = sum of key weights carries no gradient to q, k or v)
    lmul, ladd = (-1, s.nc - 1) if causal else (1, 0)
    X3 = s.X.reshape(B * Hk, S, Dv)
    dk = vjp(s.k3, X3, dS2, 1.0, s.chunk, lmul, ladd).view(B, Hk, S, D)
    dX = apply(s.k3, dS2, 1.0, s.chunk, lmul, ladd).view(B, Hk, S, Dv)
    kc, Xc = s.chunks(k, S), s.chunks(s.X, S)
    fc = s.chunks(s.f, S) if s.f is not None else 1.0
    dks = Xc @ dS1.transpose(-1, -2) + fc * (2 * (kc @ dz2) + dz1.unsqueeze(-2))
    dXs = kc @ dS1 + dS0.unsqueeze(-2)
    dvs = 0.0
    if causal:
        dW = gnv @ vc.transpose(-1, -2) + gzv
        ds = dW * M * evaluate_polynomial_derivative(sc, s.coeffs) * s.scale
        dqs = dqs + ds @ kc2
        dks = dks + ds.transpose(-1, -2) @ qv
        dvs = W.transpose(-1, -2) @ gnv
    dq = dq + _q_unview(s, dqs)
    dk = dk + dks.reshape(B, Hk, -1, D)[:, :, :S]
    dv = dX * (s.f if s.f is not None else 1.0) + (dXs * fc + dvs).reshape(B, Hk, -1, Dv)[:, :, :S]
    return dq, dk, dv
