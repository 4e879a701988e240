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

Modules: features.py (the in-register pieces: dots, tile pairs, tiles and their outer products, key weights),
sweeps.py (kv_sweep_kernel, q_sweep_kernel), diagonal.py (diag_fwd_kernel, bwd_prep_kernel, diag_bwd_kernel),
this file (launch constants, the per-call setup, the launchers and the public functions).

Kernels (shapes: q [B, Hq, L, D], k [B, Hk, S, D], v [B, Hk, S, E] with E = Dv, G = Hq // Hk, all contiguous;
fp32 accumulators NUM [B, Hq, L, E], DEN [B, Hq, L], DQ/DK/DV like q/k/v)::

    kv_sweep_kernel    grid (B*Hk, NP + 1, E / BLOCK_E).  One program keeps the key state of its pair,
                       ST = sum_j phi_k(k_j)^T (f_j v_j) [256 | D, BLOCK_E] and z = sum_j f_j phi_k(k_j) [256 | D]
                       (plus s0 = sum f v, z0 = sum f for the constant), fp32, on chip, and walks the sequence
                       in chunks of CHUNK rows: causal, chunk c's queries (all G heads, BLOCK_M rows at a time)
                       read the state of the chunks < c, then chunk c's keys are added (BLOCK_N at a time);
                       non-causal, all keys then all queries.  Forward: NUM += phi_q ST, DEN += phi_q.z (the
                       Dv-block-0 program only), fp32 atomics (all pairs write the same rows).  Backward (BWD):
                       dphi_q = Gv ST^T + gden z^T, then the tile VJP into DQ (atomics).
    diag_fwd_kernel    grid (B*Hq, L / BLOCK_M): causal, the keys of the query block's own chunk up to the
                       diagonal, W = P(s) f mask directly (flash-style, no running max: P > 0), added to NUM and
                       DEN; then out = NUM / DEN (0 where DEN = 0), in q's dtype, and DEN (the final one) kept as
                       the op's state.  Non-causal: only the normalisation.
    bwd_prep_kernel    Gv = grad / den (input dtype), gden = -(grad.out) / den (fp32), 0 where den = 0.
    q_sweep_kernel     grid (B*Hk, NP + 1, E / BLOCK_E), reverse order: the query state dST = sum_i phi_q^T Gv
                       and dz = sum_i gden_i phi_q(q_i) of the later chunks (non-causal: all queries first);
                       the keys of chunk c get DV += f phi_k dST and dphi_k = f (v dST^T + dz), then the tile VJP
                       into DK.
    diag_bwd_kernel    causal, the diagonal blocks: dW = Gv v^T + gden, ds = dW P'(s) f mask scale, DQ += ds k,
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

from .diagonal import bwd_prep_kernel, diag_bwd_kernel, diag_fwd_kernel
from .sweeps import kv_sweep_kernel, q_sweep_kernel

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
    kv_sweep_kernel[c.sweep_grid()](c.q, c.k, c.v, c.kw, num, den, num, den, num, L, c.S, c.Hk, c.G, c.nc,
                                     c.c0, c.c1s, c.c2s, BWD=False, **c.sweep_consts())
    diag_fwd_kernel[c.row_grid()](c.q, c.k, c.v, c.kw, num, den, out, L, c.S, Hq, c.G, c.scale, c.c0, c.c1, c.c2,
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
        bwd_prep_kernel[c.row_grid()](grad.contiguous(), out.contiguous(), den, gv, gden, L, E=E, BLOCK_M=c.bm,
                                       num_warps=DIAG_WARPS)
        kv_sweep_kernel[c.sweep_grid()](c.q, c.k, c.v, c.kw, gv, gden, gden, gden, dq, L, c.S, c.Hk, c.G, c.nc,
                                         c.c0, c.c1s, c.c2s, BWD=True, **c.sweep_consts())
        q_sweep_kernel[c.sweep_grid()](c.q, c.k, c.v, c.kw, gv, gden, dk, dv, L, c.S, c.Hk, c.G, c.nc,
                                        c.c0, c.c1s, c.c2s, **c.sweep_consts())
        if c.causal:
            diag_bwd_kernel[c.row_grid()](c.q, c.k, c.v, c.kw, gv, gden, dq, dk, dv, L, c.S, Hq, c.G, c.scale,
                                           c.c0, c.c1, c.c2, D=c.D, E=E, CHUNK=c.chunk, BLOCK_M=c.bm,
                                           BLOCK_N=c.bn, HAS_KW=c.has_kw, num_warps=DIAG_WARPS,
                                           num_stages=NUM_STAGES, **c.common)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
