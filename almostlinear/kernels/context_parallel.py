"""Polynomial attention over a sequence split across ranks (context parallelism): each rank passes on a
fixed-size summary of its keys instead of its keys and values.  The math (one description):

A rank holds a contiguous shard of every sequence: queries i and keys j at global positions s_r + (0..L_r - 1).
With the op's weights W_ij = P(s_ij) w_j exp(m (j - i)) [j allowed for i] (poly_attention), a rank's keys enter
every other rank's rows only through their key state (global regime, kernels/cpu/global_regime.py)::

    values_r  = sum_j phi_k(k_j)^T f_j v_j      [B, Hk, r, Gs*Dv]
    moments_r = sum_j f_j [1 | k_j | k_j k_j^T]  [B, Hk, Gs, 1 + D + D^2]     (degree 2, kernels/moments.py)

with the key factor f_j = w_j exp(m (j - (L_r - 1))) (local positions: exponents <= 0 for ALiBi slopes m >= 0).
The ranks all-gather their states (torch.distributed._functional_collectives, fp32; the rewrite's
passes/rewrite_context_parallel.py); rank r sums those it sees, each rescaled to its own first position s_r
by exp(m (s_r' + L_r' - 1 - s_r)): causal the ranks r' < r (an exclusive prefix), otherwise all of them (its own
included).  That sum is the *external state* (E_values, E_moments) :func:`poly_state_attention` reads::

    causal:      the causal op over the rank's own keys, its running key state started at E (kernels/cpu/causal.py:
                 E's key factor exp(m (j - s_r)) is the causal layout's for keys before local position 0), so every
                 chunk reads E with its own prefix: no extra pass over the queries
    non-causal:  out_i = phi_q(q_i) E_values / den_E(q_i)   (the rank's own keys are in E; the global regime's read,
                 global_regime.read_state, with no query factor: it cancels in the ratio)

with den_E(q) = c0 M0 + c1 s q.M1 + c2 s^2 q^T M2 q.  A row whose total weight is 0 gives 0.

Backward (analytic).  Causal: the causal op's backward, whose reverse scan of the query dstates, carried past
chunk 0, is E's cotangent.  Non-causal, with G = dL/dout and Gd = [G / den | -G.out / den]: dq through the
feature map's VJP (states.query_grads) and dE_values = sum_i phi_q(q_i)^T G_i / den_i.  In both, E_moments'
true cotangent is c * (the queries' moments weighted by Gd's den column), c = [c0 | c1 s | c2 s^2] (the read's
derivative).  The cotangents travel back through the collectives (the autograd of an all-gather is a
reduce-scatter: each rank receives the sum of every reader's cotangent of its state) into :func:`key_state`'s
backward: dv_j = f_j phi_k(k_j) dE_values, dk_j = J_phi^T (dE_values (f_j v_j)^T) + f_j (dM1 + (dM2 + dM2^T) k_j).

Degree 2 only (the moments' closed form).  Shapes: q [B, Hq, L, D], k [B, Hk, L, D], v [B, Hk, L, Dv] (GQA:
Hq = G Hk), key_weight [B, L] | None, alibi_slopes [Hq] | None.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import cpu
from .cpu.context import CallContext
from .cpu.global_regime import read_backward, read_state
from .cpu.states import States, key_states, value_grads
from .features import fast_rank, validate_polynomial
from .moments import moment_size
from .op import compute_dtype, compute_inputs, drop_masked_keys, register_autocast, validate_arguments

__all__ = ["key_state", "poly_state_attention", "state_shapes", "state_bytes"]


def _context(q, k, v, key_weight, alibi, scale, coeffs):
    return CallContext(q, k, v, key_weight, alibi, scale, coeffs, False, 0, cpu.CHUNK)


def state_shapes(B: int, Hq: int, Hk: int, D: int, Dv: int, alibi: bool) -> tuple[tuple, tuple]:
    """Shapes of a rank's (values, moments) (arithmetic only: the fake kernels and the report call it)."""
    Gs = Hq // Hk if alibi else 1
    return (B, Hk, fast_rank(int(D), 2), Gs * Dv), (B, Hk, Gs, moment_size(int(D), 2))


def state_bytes(B: int, Hq: int, Hk: int, D: int, Dv: int, alibi: bool, itemsize: int = 4) -> int:
    """Bytes of one rank's state (what it contributes to the all-gather), whatever its shard length."""
    return sum(math.prod(int(x) for x in shape) for shape in state_shapes(B, Hq, Hk, D, Dv, alibi)) * itemsize


# ---------------------------------------------------------------- the key state (one rank's summary)

def _key_factor(cx, j0, j1):
    """f [B, Hk, Gs, C] | None: key_weight_j exp(m (j - (S - 1))) for the keys j0..j1 (exponents <= 0 for m >= 0)."""
    f = None
    if cx.alibi is not None:
        f = torch.exp(cx.m.unsqueeze(-1) * (cx.positions(j0, j1) - float(cx.S - 1))).unsqueeze(0)
    return cx.with_key_weight(f, j0, j1)


def _key_blocks(cx):
    for blk in cx.blocks(cx.S, chunked=False):
        kT = cx.feature_major(cx.k[:, :, blk.i0:blk.i1], "kT")
        f = _key_factor(cx, blk.i0, blk.i1)
        yield blk, kT, cx.phi(kT, "k"), cx.weighted_values(cx.v[:, :, blk.i0:blk.i1], f), f


def _dummy_queries(k, query_heads):
    return k.new_empty(k.shape[0], query_heads, 0, k.shape[-1])


@torch.library.custom_op("almostlinear::poly_key_state", mutates_args=())
def _key_state_op(k: torch.Tensor, v: torch.Tensor, key_weight: Optional[torch.Tensor],
                  alibi_slopes: Optional[torch.Tensor], query_heads: int, scale: float,
                  coefficients: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, Hk, r, Gs*Dv], moments [B, Hk, Gs, M]) of the keys, in the compute dtype (module docstring)."""
    k32, v32, kw, al = compute_inputs(k, v, key_weight, alibi_slopes)
    k32, v32 = drop_masked_keys(k32, v32, kw)
    vshape, mshape = state_shapes(k.shape[0], query_heads, k.shape[1], k.shape[-1], v.shape[-1], al is not None)
    with cpu.autocast_disabled(k):
        cx = _context(_dummy_queries(k32, query_heads), k32, v32, kw, al, scale, coefficients)
        state = None
        for _, kT, phk, X, f in _key_blocks(cx):
            state = key_states(cx, kT, phk, X, f, into=state)
    if state is None:  # no keys: a zero state
        return k32.new_zeros(vshape), k32.new_zeros(mshape)
    return state.values, state.moments  # fresh products (key_states without scratch), not views of a buffer


@_key_state_op.register_fake
def _(k, v, key_weight, alibi_slopes, query_heads, scale, coefficients):
    vshape, mshape = state_shapes(k.shape[0], query_heads, k.shape[1], k.shape[-1], v.shape[-1],
                                  alibi_slopes is not None)
    dtype = compute_dtype(k)
    return k.new_empty(vshape, dtype=dtype), k.new_empty(mshape, dtype=dtype)


@torch.library.custom_op("almostlinear::poly_key_state_backward", mutates_args=())
def _key_state_bwd_op(d_values: torch.Tensor, d_moments: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_weight: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor], query_heads: int,
                      scale: float, coefficients: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv from the cotangents of the values and the moments (module docstring)."""
    k32, v32, kw, al, dS, dM = compute_inputs(k, v, key_weight, alibi_slopes, d_values, d_moments)
    k32, v32 = drop_masked_keys(k32, v32, kw)
    dk, dv = torch.zeros_like(k32), torch.zeros_like(v32)
    D = k.shape[-1]
    dM1 = dM[..., 1:1 + D].unsqueeze(-1)  # [B, Hk, Gs, D, 1]
    dM2 = dM[..., 1 + D:].unflatten(-1, (D, D))
    sym = dM2 + dM2.transpose(-1, -2)
    with cpu.autocast_disabled(k):
        cx = _context(_dummy_queries(k32, query_heads), k32, v32, kw, al, scale, coefficients)
        for blk, kT, phk, X, f in _key_blocks(cx):
            dX = phk.transpose(-1, -2) @ dS
            dphi = torch.matmul(dS, X.transpose(-1, -2), out=cx.buf("dphi", phk.shape))
            dkT = cx.vjp(kT, dphi, "k")
            moment = sym @ kT.unsqueeze(-3) + dM1  # [B, Hk, Gs, D, C]
            moment = moment.sum(-3) if f is None else (moment * f.unsqueeze(-2)).sum(-3)
            dk[:, :, blk.i0:blk.i1] = (dkT + moment).transpose(-1, -2)
            dv[:, :, blk.i0:blk.i1] = value_grads(cx, dX, f)
    if kw is not None:
        dk, dv = drop_masked_keys(dk, dv, kw)
    return dk.to(k.dtype), dv.to(v.dtype)


@_key_state_bwd_op.register_fake
def _(d_values, d_moments, k, v, key_weight, alibi_slopes, query_heads, scale, coefficients):
    return k.new_empty(k.shape), v.new_empty(v.shape)


def _key_state_setup(ctx, inputs, output):
    k, v, key_weight, alibi_slopes, query_heads, scale, coefficients = inputs
    ctx.save_for_backward(k, v, key_weight, alibi_slopes)
    ctx.args = (query_heads, scale, list(coefficients))


def _key_state_backward(ctx, d_values, d_moments):
    k, v, key_weight, alibi_slopes = ctx.saved_tensors
    dk, dv = _key_state_bwd_op(d_values.contiguous(), d_moments.contiguous(), k, v, key_weight, alibi_slopes,
                               *ctx.args)
    return dk, dv, None, None, None, None, None


_key_state_op.register_autograd(_key_state_backward, setup_context=_key_state_setup)
register_autocast(torch.ops.almostlinear.poly_key_state.default, n_cast=2)


def key_state(k, v, *, query_heads: int, scale: float, coefficients=None, key_weight=None, alibi_slopes=None):
    """A rank's key state (values, moments): see the module docstring.  Degree 2."""
    coeffs = validate_polynomial(2, coefficients)
    return _key_state_op(k, v, key_weight, alibi_slopes, int(query_heads), float(scale), list(coeffs))


# ---------------------------------------------------------------- reading an external state

def _moment_coefficients(cx):
    """c = [c0 | c1 s (D) | c2 s^2 (D^2)]: the derivative of the read with respect to each moment, per query moment."""
    D = cx.D
    c = torch.empty(moment_size(D, 2), dtype=cx.dt, device=cx.dev)
    c[0], c[1:1 + D], c[1 + D:] = cx.mom.c0, cx.mom.c1s, cx.mom.c2s2
    return c


def _read(q, k, v, kw, al, scale, coeffs, E):
    """Non-causal: out = phi_q(q) E_values / den_E(q) (global_regime.read_state); (out, den)."""
    B, Hq, L, Dv = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
    cx = _context(q, k, v, kw, al, scale, coeffs)
    out, den = q.new_empty(cx.B, cx.Hk, cx.G, L, Dv), q.new_empty(cx.B, cx.Hk, cx.G, L)
    read_state(cx, E, out, den)
    return out.view(B, Hq, L, Dv), den.view(B, Hq, L)


def _read_backward(grad, q, k, v, out, kw, al, scale, coeffs, E):
    """dq and the external state's dstates of :func:`_read` (global_regime.read_backward)."""
    cx = _context(q, k, v, kw, al, scale, coeffs)
    cx.start_backward(grad, out)
    dq = torch.zeros_like(cx.q5)
    return dq.view_as(q), read_backward(cx, dq, E)


def _state_forward(q, k, v, kw, al, scale, coeffs, causal, E, keep_states):
    """(out, the causal op's kept states | None, den [B, Hq, L]): causal, the op over the rank's own keys with the
    external state as its initial state (every chunk reads it with its prefix); otherwise the read alone."""
    B, Hq, L, Dv = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
    if not L:
        return q.new_zeros(B, Hq, 0, Dv), None, q.new_zeros(B, Hq, 0)
    if causal:
        out, den, kept = cpu.forward(q, k, v, kw, al, scale=scale, coeffs=coeffs, causal=True,
                                     keep_states=keep_states, init=E)
        return out, kept, den
    out, den = _read(q, k, v, kw, al, scale, coeffs, E)
    return out, None, den


def _state_backward(grad, q, k, v, out, kept, den, kw, al, scale, coeffs, causal, E):
    """dq, dk, dv, d E_values, d E_moments (the true cotangents)."""
    if not q.shape[2]:
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(E.values),
                torch.zeros_like(E.moments))
    if causal:
        dq, dk, dv, dE = cpu.backward(grad, q, k, v, out, kw, al, scale=scale, coeffs=coeffs, causal=True,
                                      state=kept, init=E)
    else:
        dq, dE = _read_backward(grad, q, k, v, out, kw, al, scale, coeffs, E)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    cx = _context(q, k, v, kw, al, scale, coeffs)
    return dq, dk, dv, dE.values, dE.moments * _moment_coefficients(cx)


@torch.library.custom_op("almostlinear::poly_state_attention", mutates_args=())
def _state_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: Optional[torch.Tensor],
              alibi_slopes: Optional[torch.Tensor], scale: float, coefficients: Sequence[float], causal: bool,
              ext_values: torch.Tensor, ext_moments: torch.Tensor,
              keep_states: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, Hq, L, Dv] in q's dtype, the causal op's kept states (empty: none), den [B, Hq, L]: each row's total
    weight, in the kernels' per-row scale; 0 exactly where the row sees no key)."""
    coeffs = tuple(coefficients)
    q32, k32, v32, kw, al, ev, em = compute_inputs(q, k, v, key_weight, alibi_slopes, ext_values, ext_moments)
    k32, v32 = drop_masked_keys(k32, v32, kw)
    with cpu.autocast_disabled(q):
        out, kept, den = _state_forward(q32, k32, v32, kw, al, scale, coeffs, causal, States(ev, em), keep_states)
    return out.to(q.dtype), q32.new_empty(0) if kept is None else kept, den


@_state_op.register_fake
def _(q, k, v, key_weight, alibi_slopes, scale, coefficients, causal, ext_values, ext_moments, keep_states=False):
    B, Hq, L, D = q.shape
    dtype = compute_dtype(q)
    shape = cpu.state_shape(B, Hq, k.shape[1], D, v.shape[-1], 2, alibi_slopes is not None, bool(causal), 0, L=L,
                            keep_states=keep_states, itemsize=dtype.itemsize) if causal else (0,)
    return q.new_empty(B, Hq, L, v.shape[-1]), q.new_empty(shape, dtype=dtype), q.new_empty(B, Hq, L, dtype=dtype)


@torch.library.custom_op("almostlinear::poly_state_attention_backward", mutates_args=())
def _state_bwd_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  kept: torch.Tensor, den: torch.Tensor, key_weight: Optional[torch.Tensor],
                  alibi_slopes: Optional[torch.Tensor], scale: float, coefficients: Sequence[float], causal: bool,
                  ext_values: torch.Tensor, ext_moments: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, d ext_values, d ext_moments."""
    coeffs = tuple(coefficients)
    g32, q32, k32, v32, o32, kw, al, ev, em = compute_inputs(grad, q, k, v, out, key_weight, alibi_slopes,
                                                             ext_values, ext_moments)
    k32, v32 = drop_masked_keys(k32, v32, kw)
    with cpu.autocast_disabled(q):
        dq, dk, dv, dev, dem = _state_backward(g32, q32, k32, v32, o32, kept if kept.numel() else None, den, kw, al,
                                               scale, coeffs, causal, States(ev, em))
    if kw is not None:
        dk, dv = drop_masked_keys(dk, dv, kw)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dev.to(ext_values.dtype).contiguous(),
            dem.to(ext_moments.dtype).contiguous())


@_state_bwd_op.register_fake
def _(grad, q, k, v, out, kept, den, key_weight, alibi_slopes, scale, coefficients, causal, ext_values, ext_moments):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ext_values.new_empty(ext_values.shape),
            ext_moments.new_empty(ext_moments.shape))


def _state_setup(ctx, inputs, output):
    q, k, v, key_weight, alibi_slopes, scale, coefficients, causal, ext_values, ext_moments, _keep = inputs
    out, kept, den = output
    ctx.mark_non_differentiable(kept, den)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, kept, den, key_weight, alibi_slopes, ext_values, ext_moments)
    ctx.args = (scale, list(coefficients), causal)


def _state_attention_backward(ctx, grad, _grad_kept, _grad_aux):
    if grad is None:
        return (None,) * 11
    q, k, v, out, kept, den, key_weight, alibi_slopes, ext_values, ext_moments = ctx.saved_tensors
    scale, coefficients, causal = ctx.args
    dq, dk, dv, dev, dem = _state_bwd_op(grad.contiguous(), q, k, v, out, kept, den, key_weight, alibi_slopes, scale,
                                         coefficients, causal, ext_values, ext_moments)
    return dq, dk, dv, None, None, None, None, None, dev, dem, None


_state_op.register_autograd(_state_attention_backward, setup_context=_state_setup)
register_autocast(torch.ops.almostlinear.poly_state_attention.default)


def poly_state_attention(q, k, v, ext_values, ext_moments, *, scale: float, coefficients=None, causal: bool = False,
                         key_weight=None, alibi_slopes=None) -> torch.Tensor:
    """Polynomial attention of a rank's queries against its own keys (causal; none otherwise) and an external key
    state (the module docstring).  q [B, Hq, L, D], k [B, Hk, L, D], v [B, Hk, L, Dv], ext_values / ext_moments in
    :func:`state_shapes` -> [B, Hq, L, Dv].  Degree 2."""
    validate_arguments(q, k, v, scale=scale, causal=causal, key_weight=key_weight, alibi_slopes=alibi_slopes,
                       window=0)
    coeffs = validate_polynomial(2, coefficients)
    shapes = state_shapes(q.shape[0], q.shape[1], k.shape[1], q.shape[-1], v.shape[-1], alibi_slopes is not None)
    for name, t, shape in (("ext_values", ext_values, shapes[0]), ("ext_moments", ext_moments, shapes[1])):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {list(shape)} (state_shapes); got {list(t.shape)}")
    keep_states = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return _state_op(q, k, v, key_weight, alibi_slopes, float(scale), list(coeffs), bool(causal), ext_values,
                     ext_moments, keep_states)[0]
