"""Polynomial attention with an exact local window: exp(s) on the W nearest keys, P(s) on the others, one
normaliser.  The math (one description; a GPU version follows it):

For query i, with s_ij = scale q_i . k_j, the op's multiplier M_ij = key_weight_j exp(m_h (j - i)) [j allowed for i]
(causal, mask window, padding, ALiBi: as poly_attention) and the near set N(i) = {j : i - W < j <= i} (causal) or
{j : |i - j| < W} (otherwise)::

    w_ij = exp(s_ij) M_ij  (j in N(i)),   P(s_ij) M_ij  (otherwise)
    out_i = sum_j w_ij v_j / sum_j w_ij

Computed as the polynomial op over all allowed keys plus a correction on the near keys,
w_ij = P(s_ij) M_ij + [j in N(i)] (exp(s_ij) - P(s_ij)) M_ij: linear in n for a fixed W (the polynomial op
through its states, the correction on a band of about C + W keys per query, kernels/cpu/near_field.py).  The
polynomial kernels return den_p,i = c_i sum_j P(s_ij) M_ij, with c_i a per-row scale that keeps their ALiBi
exponents <= 0 (:func:`kernel_log_scale`); the correction is taken in the same scale.  For stability every
row is shifted by t_i = max(log den_p,i, max_{j in N(i)} (s_ij + l'_ij), max_{j in N(i)} l'_ij) with
l'_ij = log(c_i M_ij)::

    C_ij = exp(s_ij + l'_ij - t_i) - P(s_ij) exp(l'_ij - t_i)          (j in N(i))
    a_i = den_p,i exp(-t_i),   den'_i = a_i + sum_j C_ij,   out_i = (a_i out_p,i + sum_j C_ij v_j) / den'_i

so every term is at most about P(s) in size (no overflow for logits of any size; where the window's exp(s)
dominates, a_i underflows to 0 and the row is exact attention over its window).  A row with no allowed key
gives 0.

Backward (analytic).  With G = dL/dout and alpha_i = a_i / den'_i: the polynomial part's gradients are the
polynomial op's backward called with grad alpha G and the combined out (its Gd = [alpha G / den_p |
-alpha G.out / den_p] = [G e^{-t} / den' | -G.out e^{-t} / den'] is exactly the gradient of the combined
normalisation with respect to its numerator and denominator).  The correction: dC_ij = (G_i . v_j - G_i . out_i)
/ den'_i, dv_j += sum_i C_ij G_i / den'_i, ds_ij = scale dC_ij (exp(s_ij + l'_ij - t_i) - P'(s_ij)
exp(l'_ij - t_i)), dq_i += sum_j ds_ij k_j, dk_j += sum_i ds_ij q_i.

Shapes: q [B, Hq, L, D], k [B, Hk, L, D], v [B, Hk, L, Dv] (GQA: Hq = G Hk; self-attention: L = S),
key_weight [B, L] | None, alibi_slopes [Hq] | None -> [B, Hq, L, Dv].
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import cpu
from .cpu.near_field import NearField, kept_size, near_backward, near_forward, reciprocal
from .features import validate_polynomial
from .op import compute_dtype, compute_inputs, validate_arguments, drop_masked_keys, exact_attention, register_autocast

__all__ = ["poly_window_attention", "kernel_log_scale", "window_backward_recomputed"]


def kernel_log_scale(alibi_slopes, L: int, S: int, causal: bool, window: int, dtype=torch.float32):
    """log c_i [Hq, L] (None without ALiBi): the polynomial kernels' per-row scale, den_p,i = c_i sum_j W_ij.
    Global: key factor exp(m (j - j*)), j* the argmax of m j, so c_i = exp(m (i - j*)); causal: key factor
    exp(m j - a i) (a = max(m, 0)), c_i = exp((m - a) i); banded (mask window): the row maximum of m (j - i) over
    the row's band is subtracted (kernels/cpu/context.py)."""
    if alibi_slopes is None:
        return None
    m = alibi_slopes.to(dtype).unsqueeze(-1)
    i = torch.arange(L, dtype=dtype, device=alibi_slopes.device)
    if window:
        lo = (i - window + 1).clamp_min(0)
        hi = i if causal else (i + window - 1).clamp_max(S - 1)
        return -torch.maximum(m * (lo - i), m * (hi - i))
    if causal:
        return m.clamp_max(0.0) * i
    return m * (i - torch.where(m > 0, float(S - 1), 0.0))


def _near(q, k, v, kw, al, scale, coeffs, causal, window, exact_window):
    return NearField(q, k, v, kw, al, kernel_log_scale(al, q.shape[2], k.shape[2], causal, window, q.dtype),
                     scale=scale, coeffs=coeffs, causal=causal, window=window, exact_window=exact_window)


def band_size(q, k, exact_window, causal, keep_states) -> int:
    """Elements of the band weights the forward keeps for the backward (0: none): with ``keep_states``, up to
    cpu.KEEP_STATES_MIB per call (~1.15 KB per token and query head at W = 64 non-causal, 0.64 KB causal)."""
    if not keep_states:
        return 0
    return kept_size(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], exact_window, causal,
                     compute_dtype(q).itemsize, cpu.KEEP_STATES_MIB)


def forward(q, k, v, key_weight=None, alibi_slopes=None, *, scale, coeffs, causal=False, window=0, exact_window,
            keep_states=False):
    """(out [B, Hq, L, Dv], the polynomial part's state (None: none), aux [3, B, Hq, L] = (a, t, den'): see
    near_field.near_forward, the kept band weights (flat; empty: none))."""
    with cpu.autocast_disabled(q):
        out_p, den_p, state = cpu.forward(q, k, v, key_weight, alibi_slopes, scale=scale, coeffs=coeffs,
                                          causal=causal, window=window, keep_states=keep_states)
        nf = _near(q, k, v, key_weight, alibi_slopes, scale, coeffs, causal, window, exact_window)
        band = q.new_empty(band_size(q, k, exact_window, causal, keep_states))
        out, t, den, a = near_forward(nf, out_p, den_p, band if band.numel() else None)
    return out, state, torch.stack([a, t, den]), band


def backward(grad, q, k, v, out, aux, key_weight=None, alibi_slopes=None, *, scale, coeffs, causal=False, window=0,
             exact_window, state=None, band=None):
    """dq, dk, dv given the forward's out and aux (and its polynomial state and kept band, or None: recomputed)."""
    a, t, den = aux.unbind(0)
    with cpu.autocast_disabled(q):
        share = (a * reciprocal(den)).unsqueeze(-1)  # the polynomial part's share of each row
        dq, dk, dv = cpu.backward(grad * share, q, k, v, out, key_weight, alibi_slopes, scale=scale, coeffs=coeffs,
                                  causal=causal, window=window, state=state)
        nf = _near(q, k, v, key_weight, alibi_slopes, scale, coeffs, causal, window, exact_window)
        near = near_backward(nf, grad, out, t, den, band)
    return dq.add_(near[0]), dk.add_(near[1]), dv.add_(near[2])


@torch.library.custom_op("almostlinear::poly_window_attention", mutates_args=())
def _window_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: Optional[torch.Tensor],
               alibi_slopes: Optional[torch.Tensor], scale: float, coefficients: Sequence[float], causal: bool,
               window: int, exact_window: int,
               keep_states: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, Hq, L, Dv] in q's dtype, the polynomial part's state (empty: none), aux [3, B, Hq, L], the kept
    band weights (flat; empty: none))."""
    coeffs = tuple(coefficients)
    q32, k32, v32, kw, al = compute_inputs(q, k, v, key_weight, alibi_slopes)
    k32, v32 = drop_masked_keys(k32, v32, kw)
    out, state, aux, band = forward(q32, k32, v32, kw, al, scale=scale, coeffs=coeffs, causal=causal, window=window,
                                    exact_window=exact_window, keep_states=keep_states)
    return out.to(q.dtype), q32.new_empty(0) if state is None else state, aux, band


@_window_op.register_fake
def _(q, k, v, key_weight, alibi_slopes, scale, coefficients, causal, window, exact_window, keep_states=False):
    B, Hq, L, D = q.shape
    dtype = compute_dtype(q)
    shape = cpu.state_shape(B, Hq, k.shape[1], D, v.shape[-1], len(coefficients) - 1, alibi_slopes is not None,
                            causal, window, L=L, keep_states=keep_states, itemsize=dtype.itemsize)
    return (q.new_empty(B, Hq, L, v.shape[-1]), q.new_empty(shape, dtype=dtype), q.new_empty(3, B, Hq, L, dtype=dtype),
            q.new_empty(band_size(q, k, exact_window, causal, keep_states), dtype=dtype))


@torch.library.custom_op("almostlinear::poly_window_attention_backward", mutates_args=())
def _window_bwd_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   state: torch.Tensor, aux: torch.Tensor, band: torch.Tensor, key_weight: Optional[torch.Tensor],
                   alibi_slopes: Optional[torch.Tensor], scale: float, coefficients: Sequence[float], causal: bool,
                   window: int, exact_window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    coeffs = tuple(coefficients)
    g32, q32, k32, v32, o32, kw, al = compute_inputs(grad, q, k, v, out, key_weight, alibi_slopes)
    k32, v32 = drop_masked_keys(k32, v32, kw)
    dq, dk, dv = backward(g32, q32, k32, v32, o32, aux, kw, al, scale=scale, coeffs=coeffs, causal=causal,
                          window=window, exact_window=exact_window, state=state if state.numel() else None,
                          band=band if band.numel() else None)
    if kw is not None:
        dk, dv = drop_masked_keys(dk, dv, kw)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_window_bwd_op.register_fake
def _(grad, q, k, v, out, state, aux, band, key_weight, alibi_slopes, scale, coefficients, causal, window,
      exact_window):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_weight, alibi_slopes, scale, coefficients, causal, window, exact_window, _keep = inputs
    out, state, aux, band = output
    ctx.mark_non_differentiable(state, aux, band)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, state, aux, band, key_weight, alibi_slopes)
    ctx.args = (scale, list(coefficients), causal, window, exact_window)


def _backward(ctx, grad, _grad_state, _grad_aux, _grad_band):
    if grad is None:
        return (None,) * 11
    q, k, v, out, state, aux, band, key_weight, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = _window_bwd_op(grad.contiguous(), q, k, v, out, state, aux, band, key_weight, alibi_slopes,
                                *ctx.args)
    return (dq, dk, dv) + (None,) * 8


_window_op.register_autograd(_backward, setup_context=_setup_context)


def window_backward_recomputed(grad, q, k, v, key_weight, alibi_slopes, scale, coefficients, causal, window,
                               exact_window):
    """dq, dk, dv with the forward recomputed (its row shifts, denominators and out): for callers that did not
    keep them (the switchable op, whose saved state does not depend on its mode)."""
    out, state, aux, band = _window_op(q, k, v, key_weight, alibi_slopes, scale, list(coefficients), causal, window,
                                       exact_window)
    return _window_bwd_op(grad, q, k, v, out, state, aux, band, key_weight, alibi_slopes, scale, list(coefficients),
                          causal, window, exact_window)


register_autocast(torch.ops.almostlinear.poly_window_attention.default)


def poly_window_attention(q, k, v, *, scale: float, exact_window: int, degree: int = 2, coefficients=None,
                          causal: bool = False, key_weight=None, alibi_slopes=None, window: int = 0,
                          min_seq_len: int = 0) -> torch.Tensor:
    """Polynomial attention with exp(s) on the ``exact_window`` nearest keys (see the module docstring).
    q [B, Hq, L, D], k [B, Hk, L, D], v [B, Hk, L, Dv] -> [B, Hq, L, Dv].  exact_window = 0 is
    :func:`poly_attention`; a window that covers every key is exact attention (computed by the op all the same).
    Below ``min_seq_len`` keys, exact attention."""
    from .op import poly_attention
    validate_arguments(q, k, v, scale=scale, causal=causal, key_weight=key_weight, alibi_slopes=alibi_slopes, window=window)
    if isinstance(exact_window, bool) or not isinstance(exact_window, int) or exact_window < 0:
        raise ValueError(f"exact_window must be an int >= 0 (0 = no exact window); got {exact_window!r}")
    if exact_window == 0:
        return poly_attention(q, k, v, scale=scale, degree=degree, coefficients=coefficients, causal=causal,
                              key_weight=key_weight, alibi_slopes=alibi_slopes, window=window, min_seq_len=min_seq_len)
    L, S = q.shape[2], k.shape[2]
    if L != S:
        raise ValueError(f"exact_window > 0 needs equal query and key lengths (self-attention); got L={L}, S={S}")
    coeffs = validate_polynomial(degree, coefficients)
    if window and window >= L:
        window = 0
    if S < min_seq_len:
        return exact_attention(q, k, v, scale=scale, causal=causal, key_weight=key_weight,
                               alibi_slopes=alibi_slopes, window=window)
    keep_states = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return _window_op(q, k, v, key_weight, alibi_slopes, float(scale), list(coeffs), bool(causal), int(window),
                      min(int(exact_window), L), keep_states)[0]
