"""Fast pure-torch path (any device; the default on CPU): chunked forward and analytic backward.

Shapes: q [B, Hq, L, D], k [B, Hk, S, D], v [B, Hk, S, Dv], key_weight [B, S] | None,
alibi_slopes [Hq] | None.  All inputs float32 (or float64) and contiguous; outputs in the same dtype.
GQA: queries are viewed as [B, Hk, G, L, D] (G = Hq // Hk); K/V are never repeated.

Three regimes, each O(n) memory and never holding more than one block of features, one module each:

* global (non-causal, no window; global_regime.py): state S = phi_k(K)^T (f*V) ([r, Dv], f = key factor) and
  the keys' moments (kernels/moments.py), out = phi_q(Q) S / den with den = sum_j f_j P(s q.k_j) read from them.
* causal (no window; causal.py): chunks of ``chunk`` tokens; inside a chunk P(scale q.k) directly in d-space
  with a tril mask, across chunks the running (ALiBi-decayed) state; g chunks per block, whose chunk states,
  prefix states and reads are batched matmuls.
* banded (window > 0; banded.py): every query chunk against the key band it can see, P(s) directly in
  d-space: O(L * (chunk + 2 * window) * D), linear in n for a fixed window.

Degree 2 uses the block-symmetric feature layout (features.Quad2Features; rank 2,145 at d = 64), built
feature-major ([r, tokens]) so that every elementwise op runs along the tokens.  Blocks of about
context.BLOCK_ROWS rows (B * Hq * tokens) keep each op large enough for all intra-op threads.

Shared: context.py (per-call setup, weight factors, blocking), direct.py (P(s) on a block of scores),
states.py (the state products, all plain matmuls).

Weights: W_ij = P(s_ij) * key_weight_j * exp(m_h (j - i)) * valid_ij.  The ALiBi factor is split into a
key part and a query part that cancels in the normalisation, so exponents never exceed 0
(no overflow at j = 65536): global uses exp(m (j - j*)) with j* the argmax of m j; causal uses
exp(a (j - i) + (m - a) j) with a = max(m, 0) (a decayed state); banded subtracts the row maximum.
A row whose weights are all zero (all keys masked) gives 0.

The backward is analytic (see docs/architecture.md, "The op's math"): Gd = [Gv | gden] = [G / den | -Delta / den],
dphi_q = Gv S^T, dS = phi_q^T Gv, dphi_k = X dS^T, dX = phi_k dS, then through phi's Jacobian (FeatureMap.vjp);
the denominator's share goes through the moments (the queries' moments weighted gden, read by the keys);
causal uses reverse prefix sums over chunks; intra-chunk terms via P'(s).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from ..features import fast_rank
from ..moments import moment_size
from .banded import banded_backward, banded_forward
from .causal import causal_backward, causal_forward
from .context import CallContext
from .global_regime import global_backward, global_forward
from .states import States

__all__ = ["CHUNK", "forward", "backward", "state_shape", "autocast_disabled"]

CHUNK = 128

# The causal forward keeps the key States before each chunk for the backward (saving it one [n, r] x [r, Dv]
# product, a feature build and a scan: ~10% of fwd+bwd at n = 32k, d = 64) when they take at most this many MiB
# per call: ~4.3 KB per token and key head at d = 64 (fp32), so 256 MiB covers B * Hk * n <= ~60k.  0: always
# recompute.
KEEP_STATES_MIB = float(os.environ.get("ALMOSTLINEAR_KEEP_STATES_MIB", 256))


def autocast_disabled(t: torch.Tensor):
    """Context with autocast off for ``t``'s device type.  The kernels compute in their inputs' dtypes
    (float32 / float64 features and accumulation); inside an autocast region their matmuls would be recast to
    bfloat16 / float16 (failing on out= scratch buffers, silently losing precision elsewhere)."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()


def _no_autocast(fn):
    """Run ``fn`` (a kernel entry point; its first argument is a tensor on the kernel's device) with autocast off."""
    @functools.wraps(fn)
    def wrapper(t, *args, **kwargs):
        with autocast_disabled(t):
            return fn(t, *args, **kwargs)
    return wrapper


def _kept_sizes(B, Hq, Hk, L, D, Dv, degree, alibi: bool, chunk: int):
    """(NC, values' numel per chunk, moments' numel per chunk) of the causal per-chunk States
    ([NC, B, Hk, r, Gs*Dv] and [NC, B, Hk, Gs, M])."""
    Gs = Hq // Hk if alibi else 1
    per_head = fast_rank(D, degree) * Gs * Dv, Gs * moment_size(D, degree)
    return (L + chunk - 1) // chunk, B * Hk * per_head[0], B * Hk * per_head[1]


def _kept_views(flat, cx):
    """States views [NC, B, Hk, ...] of a flat kept-states tensor."""
    nc, nv, nm = _kept_sizes(cx.B, cx.Hq, cx.Hk, cx.L, cx.D, cx.Dv, len(cx.coeffs) - 1, cx.alibi is not None,
                             cx.chunk)
    if flat.shape != (nc * (nv + nm),):
        raise ValueError(f"state of shape {tuple(flat.shape)} is not the causal forward's kept states for these "
                         f"inputs and chunk {cx.chunk} (expected ({nc * (nv + nm)},)); pass the forward's state "
                         "with the same chunk, or None")
    values = flat[:nc * nv].view(nc, cx.B, cx.Hk, -1, cx.Gs * cx.Dv)
    return States(values, flat[nc * nv:].view(nc, cx.B, cx.Hk, cx.Gs, -1))


@_no_autocast
def forward(q, k, v, key_weight=None, alibi_slopes=None, *, scale, coeffs, causal=False, window=0,
            chunk=None, keep_states=False, init=None):
    """Returns out [B, Hq, L, Dv], den [B, Hq, L] (den = sum_j W_ij) and the state :func:`backward` reuses
    (None where there is none): the global value state S [B, Hk, r, Gs*Dv] in the non-causal, unwindowed case
    (saves rebuilding it, one of the backward's [n, r] x [r, Dv] products); causal, with ``keep_states`` and
    within KEEP_STATES_MIB, the key States before each chunk, flat (see :func:`state_shape`).  ``init`` (causal
    only): States of keys before position 0 that every query also attends to (causal.py)."""
    cx = CallContext(q, k, v, key_weight, alibi_slopes, scale, coeffs, causal, window, chunk or CHUNK)
    out = q.new_empty(cx.B, cx.Hk, cx.G, cx.L, cx.Dv)
    den = q.new_empty(cx.B, cx.Hk, cx.G, cx.L)
    state = None
    if window > 0:
        banded_forward(cx, out, den)
    elif causal:
        shape = state_shape(cx.B, cx.Hq, cx.Hk, cx.D, cx.Dv, len(coeffs) - 1, alibi_slopes is not None, True, 0,
                            L=cx.L, keep_states=keep_states, itemsize=q.element_size(), chunk=cx.chunk)
        if shape != (0,):
            state = q.new_empty(shape)
        causal_forward(cx, out, den, None if state is None else _kept_views(state, cx), init)
    else:
        state = global_forward(cx, out, den)
    return out.view(cx.B, cx.Hq, cx.L, cx.Dv), den.view(cx.B, cx.Hq, cx.L), state


@_no_autocast
def backward(grad, q, k, v, out, key_weight=None, alibi_slopes=None, *, scale, coeffs, causal=False,
             window=0, chunk=None, state=None, init=None):
    """Analytic backward. grad, out: [B, Hq, L, Dv] (same dtype as q); state: what :func:`forward` returned (the
    non-causal global state, or the causal kept states with the same chunk; rebuilt when None). Returns dq, dk,
    dv; with ``init`` (causal, the forward's initial States) dq, dk, dv and the initial States' cotangent."""
    cx = CallContext(q, k, v, key_weight, alibi_slopes, scale, coeffs, causal, window, chunk or CHUNK)
    cx.start_backward(grad, out)
    dq = torch.zeros_like(cx.q5)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    if window > 0:
        banded_backward(cx, dq, dk, dv)
    elif causal:
        d_init = causal_backward(cx, dq, dk, dv, None if state is None else _kept_views(state, cx), init)
        if init is not None:
            return dq.view_as(q), dk, dv, d_init
    else:
        global_backward(cx, dq, dk, dv, state)
    return dq.view_as(q), dk, dv


def state_shape(B, Hq, Hk, D, Dv, degree, alibi: bool, causal: bool, window: int, *, L=0, keep_states=False,
                itemsize=4, chunk=None) -> tuple:
    """Shape of the state :func:`forward` returns; (0,) where it returns None.  Arithmetic only (the op's fake
    kernel calls it): no feature map or table is built."""
    if causal or window > 0:
        if not (causal and not window and keep_states):
            return (0,)
        nc, nv, nm = _kept_sizes(B, Hq, Hk, L, int(D), int(Dv), degree, alibi, chunk or CHUNK)
        numel = nc * (nv + nm)
        return (numel,) if numel * itemsize <= KEEP_STATES_MIB * 2 ** 20 else (0,)
    Gs = Hq // Hk if alibi else 1
    return (B, Hk, fast_rank(int(D), degree), Gs * Dv)
