"""Custom op glue, public entry point, device dispatch and the exact fallback.

``torch.ops.almostlinear.poly_attention(q, k, v, key_weight, alibi_slopes, scale, coefficients, causal,
window, keep_states=False) -> (out, state)`` is the low-rank op (degree = len(coefficients) - 1), with an analytic backward op
``torch.ops.almostlinear.poly_attention_backward``; ``state`` (non-differentiable) carries what the
backward would otherwise recompute, like the logsumexp of aten's flash attention.  :func:`poly_attention`
validates the arguments, normalises them and either calls the op or, when the key length is below
``min_seq_len``, computes exact softmax attention with the same mask semantics (SDPA, fully masked rows -> 0).

Dispatch: CUDA tensors with degree 2 and mask kinds none / causal / key_padding / causal+key_padding
use the Triton kernels (almostlinear.kernels.triton); everything else (CPU, ALiBi, window, degree > 2,
Triton unavailable) uses the chunked torch path (almostlinear.kernels.cpu), which runs on any device.

Autocast: like matmul / SDPA, the op casts q, k, v to the autocast dtype and runs with autocast off (see
:func:`register_autocast`); the fake kernels compute shapes only (no feature tables).
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..kinds import MaskKind
from . import cpu
from .features import validate_polynomial
from .key_mask import allowed_keys

__all__ = ["poly_attention", "drop_masked_keys", "DEFAULT_MIN_SEQ_LEN", "DEFAULT_MIN_SEQ_LEN_CAUSAL",
           "default_min_seq_len", "mask_kind", "exact_attention", "allowed_keys"]

# Key length below which exact attention is faster (fwd+bwd, d=64, B=H=1), measured with
# benchmarks/attention.py at the default thread count (CPU: AMD EPYC 2 cores, torch 2.13, 2 threads, op and
# SDPA interleaved, the op with the denominator in moments (kernels/moments.py), the kept causal states and the
# scratch chunk states, the bound feature views: non-causal 1.62x (min) / 1.22x (median) at 4k, 3.1x at 8k;
# causal 0.62x at 4k, 1.25x / 1.22x at 8k, 2.7x at 16k; one thread (d = 64, before the bound views):
# non-causal 1.15x at 4k, causal 0.93x / 0.98x at 8k) and benchmarks/gpu_check.py (H200, bf16 inputs, vs flash SDPA: non-causal d=64
# wins 1.65x at 65536 and loses 0.52x at 32768; d=128 and causal still lose at 65536).  See
# benchmarks/results/attention*.  Non-causal values; causal ones in DEFAULT_MIN_SEQ_LEN_CAUSAL.
DEFAULT_MIN_SEQ_LEN = {"cpu": 4096, "cuda": 65536}
DEFAULT_MIN_SEQ_LEN_CAUSAL = {"cpu": 8192, "cuda": 131072}


def default_min_seq_len(device, causal: bool = False) -> int:
    """Crossover key length for a device (str / torch.device / tensor); exact attention is faster below it."""
    if isinstance(device, torch.Tensor):
        device = device.device
    kind = torch.device(device).type
    table = DEFAULT_MIN_SEQ_LEN_CAUSAL if causal else DEFAULT_MIN_SEQ_LEN
    return table.get(kind, table["cpu"])


def mask_kind(causal: bool, key_weight=None, alibi_slopes=None, window: int = 0) -> MaskKind:
    """The mask kind of an argument combination (ALiBi/window with padding map to the base kind)."""
    if alibi_slopes is not None:
        return MaskKind.ALIBI
    if window:
        return MaskKind.CAUSAL_WINDOW if causal else MaskKind.WINDOW
    if key_weight is not None:
        return MaskKind.CAUSAL_KEY_PADDING if causal else MaskKind.KEY_PADDING
    return MaskKind.CAUSAL if causal else MaskKind.NONE


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        importlib.import_module(f"{__package__}.triton.poly_attention")
    except Exception:
        return False
    return True


def _use_triton(q, v, degree, key_weight, alibi_slopes, window) -> bool:
    if not q.is_cuda or degree != 2 or alibi_slopes is not None or window:
        return False
    if os.environ.get("ALMOSTLINEAR_DISABLE_TRITON"):
        return False
    if not _triton_importable():  # pragma: no cover - triton missing or broken
        return False
    return q.shape[-1] in (16, 32, 64, 128) and v.shape[-1] in (16, 32, 64, 128)


def compute_dtype(t):
    """The kernels' dtype for inputs like ``t``: float64 stays, everything else computes in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def compute_inputs(*ts):
    """The tensors (None stays None) in the compute dtype of the first, contiguous."""
    return [None if t is None else t.to(compute_dtype(ts[0])).contiguous() for t in ts]


def drop_masked_keys(k: torch.Tensor, v: torch.Tensor, key_weight: Optional[torch.Tensor]):
    """k, v with the keys of weight 0 set to 0: such a key never contributes, whatever its values (a NaN or inf
    left in a padded position by an earlier layer would otherwise enter the states as 0 * NaN = NaN, and every
    query of the sequence would become NaN). One O(B * H * S * D) select each; the gradient of a dropped key is
    0, as in softmax attention."""
    if key_weight is None:
        return k, v
    kept = (key_weight != 0).reshape(key_weight.shape[0], 1, key_weight.shape[1], 1)
    return torch.where(kept, k, 0.0), torch.where(kept, v, 0.0)


@torch.library.custom_op("almostlinear::poly_attention", mutates_args=())
def _poly_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: Optional[torch.Tensor],
                       alibi_slopes: Optional[torch.Tensor], scale: float, coefficients: Sequence[float],
                       causal: bool, window: int, keep_states: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B, Hq, L, Dv] in q's dtype, state): state is what the backward reuses instead of
    recomputing (the non-causal global state of the torch path or the Triton path's flat state; causal on the
    torch path, with ``keep_states`` and within cpu.KEEP_STATES_MIB, the key states before each chunk; else
    empty).  ``keep_states``: a backward will follow (set by :func:`poly_attention` and the rewriter from
    whether the output needs grad); it only trades memory for the backward's time, never the result."""
    coeffs = tuple(coefficients)
    q32, k32, v32, kw, al = compute_inputs(q, k, v, key_weight, alibi_slopes)
    k32, v32 = drop_masked_keys(k32, v32, kw)
    with cpu.autocast_disabled(q):  # called with autocast on (no rule for this device): still compute in fp32
        if _use_triton(q, v, len(coeffs) - 1, key_weight, alibi_slopes, window):
            from .triton import poly_attention as tr
            out, state = tr.forward(q32, k32, v32, kw, scale=scale, coeffs=coeffs, causal=causal)
        else:
            out, _, state = cpu.forward(q32, k32, v32, kw, al, scale=scale, coeffs=coeffs, causal=causal,
                                        window=window, keep_states=keep_states)
    return out.to(q.dtype), q32.new_empty(0) if state is None else state


@_poly_attention_op.register_fake
def _(q, k, v, key_weight, alibi_slopes, scale, coefficients, causal, window, keep_states=False):
    # shapes only: the state shape is arithmetic (building feature tables here, under the FakeTensorMode, made
    # the first compile take minutes at d = 128)
    B, Hq, L, D = q.shape
    degree = len(coefficients) - 1
    dtype = compute_dtype(q)
    if _use_triton(q, v, degree, key_weight, alibi_slopes, window):
        from .triton import poly_attention as tr
        shape = (0,) if causal else (tr.state_size(B, k.shape[1], D, v.shape[-1]),)
    else:
        shape = cpu.state_shape(B, Hq, k.shape[1], D, v.shape[-1], degree, alibi_slopes is not None, causal,
                                window, L=L, keep_states=keep_states, itemsize=dtype.itemsize)
    return q.new_empty(B, Hq, L, v.shape[-1]), q.new_empty(shape, dtype=dtype)


@torch.library.custom_op("almostlinear::poly_attention_backward", mutates_args=())
def _poly_attention_bwd_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, state: torch.Tensor, key_weight: Optional[torch.Tensor],
                           alibi_slopes: Optional[torch.Tensor], scale: float, coefficients: Sequence[float],
                           causal: bool, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv; ``state`` is the forward's second output (empty: recompute)."""
    coeffs = tuple(coefficients)
    g32, q32, k32, v32, o32, kw, al = compute_inputs(grad, q, k, v, out, key_weight, alibi_slopes)
    k32, v32 = drop_masked_keys(k32, v32, kw)
    with cpu.autocast_disabled(q):  # a backward run inside an autocast region must not recast the kernels
        if _use_triton(q, v, len(coeffs) - 1, key_weight, alibi_slopes, window):
            from .triton import poly_attention as tr
            dq, dk, dv = tr.backward(g32, q32, k32, v32, o32, kw, scale=scale, coeffs=coeffs, causal=causal,
                                     saved_state=state if state.numel() else None)
        else:
            dq, dk, dv = cpu.backward(g32, q32, k32, v32, o32, kw, al, scale=scale, coeffs=coeffs,
                                      causal=causal, window=window, state=state if state.numel() else None)
    if kw is not None:  # a dropped key gets no gradient (its features were zeroed, not removed)
        dk, dv = drop_masked_keys(dk, dv, kw)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_poly_attention_bwd_op.register_fake
def _(grad, q, k, v, out, state, key_weight, alibi_slopes, scale, coefficients, causal, window):
    # contiguous, like the real kernels' outputs (empty_like would keep a transposed q's strides)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, key_weight, alibi_slopes, scale, coefficients, causal, window, _keep_states = inputs
    out, state = output
    ctx.mark_non_differentiable(state)
    # no zero cotangent for the state: materialised, it cost a fill of the whole kept causal states (145 MB at
    # 32k, ~47 ms) per backward
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, state, key_weight, alibi_slopes)
    ctx.args = (scale, list(coefficients), causal, window)


def _backward(ctx, grad, _grad_state):
    if grad is None:  # the output took no part in the loss
        return (None,) * 10
    q, k, v, out, state, key_weight, alibi_slopes = ctx.saved_tensors
    scale, coefficients, causal, window = ctx.args
    dq, dk, dv = _poly_attention_bwd_op(grad.contiguous(), q, k, v, out, state, key_weight, alibi_slopes, scale,
                                        coefficients, causal, window)
    return dq, dk, dv, None, None, None, None, None, None, None


_poly_attention_op.register_autograd(_backward, setup_context=_setup_context)

# Autocast.  The op stands in for matmul / softmax / SDPA, which autocast runs in its lower precision dtype: in an
# autocast region floating q, k, v (float64 excepted) on that device are cast to the autocast dtype (bfloat16 or
# float16, read at call time) and the op runs with autocast off, so the output has the dtype eager attention
# would have and autograd's casts bring fp32 inputs fp32 gradients.  Without this rule the op ran on whatever
# arrived, under autocast: fp32 out where eager gives bf16, and the kernels' fp32 matmuls recast to bf16 (an
# out= scratch buffer then failed).  Key weights and ALiBi slopes stay as they are (the kernels use them in
# fp32).  The backward ops need no rule: their inputs are the forward's, and they compute with autocast off.
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")
_autocast_lib = torch.library.Library("almostlinear", "IMPL")


def _autocast_eligible(t, device_type: str) -> bool:
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device_type
            and t.dtype is not torch.float64)


def register_autocast(op, n_cast: int = 3) -> None:
    """Give an almostlinear attention op (OpOverload) the autocast rule above: its first ``n_cast`` arguments
    (q, k, v) are cast."""
    for device_type in AUTOCAST_DEVICES:
        if not torch.amp.is_autocast_available(device_type):
            continue
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, device_type=device_type, keyset=keyset):
            dtype = torch.get_autocast_dtype(device_type)
            args = tuple(a.to(dtype) if i < n_cast and _autocast_eligible(a, device_type) else a
                         for i, a in enumerate(args))
            with torch._C._ExcludeDispatchKeyGuard(keyset):
                return op(*args)

        _autocast_lib.impl(op._schema.name.split("::")[-1], kernel, key, with_keyset=True)


register_autocast(torch.ops.almostlinear.poly_attention.default)


def validate_arguments(q, k, v, *, scale, causal, key_weight, alibi_slopes, window):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, T, D]; got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point (float16, bfloat16, float32, float64); got {t.dtype}")
    B, Hq, L, D = q.shape
    Bk, Hk, S, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {v.shape[0]}")
    if Dk != D:
        raise ValueError(f"q and k head dims differ: {D} vs {Dk}")
    if v.shape[1] != Hk or v.shape[2] != S:
        raise ValueError(f"k [B, Hk, S, D] {tuple(k.shape)} and v [B, Hk, S, Dv] {tuple(v.shape)} disagree")
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of key/value heads Hk={Hk} (GQA)")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0 = no window); got {window!r}")
    if causal and L != S:
        raise ValueError(f"causal=True needs equal query and key lengths (top-left aligned); got L={L}, S={S}")
    if window and L != S:
        raise ValueError(f"window > 0 needs equal query and key lengths; got L={L}, S={S}")
    if key_weight is not None and tuple(key_weight.shape) != (B, S):
        raise ValueError(f"key_weight must have shape [B, S] = {[B, S]}; got {list(key_weight.shape)}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (Hq,):
        raise ValueError(f"alibi_slopes must have shape [Hq] = [{Hq}]; got {list(alibi_slopes.shape)}")
    if not isinstance(scale, (int, float, torch.SymFloat, torch.SymInt)):
        raise ValueError(f"scale must be a float; got {type(scale).__name__}")


def poly_attention(q, k, v, *, scale: float, degree: int = 2, coefficients=None, causal: bool = False,
                   key_weight=None, alibi_slopes=None, window: int = 0, min_seq_len: int = 0) -> torch.Tensor:
    """Low-rank polynomial attention. q [B, Hq, L, D], k [B, Hk, S, D], v [B, Hk, S, Dv] -> [B, Hq, L, Dv].

    Weights P(scale q.k) * key_weight_j * exp(m_h (j - i)) on the allowed keys (causal: j <= i;
    window w: causal i - w < j <= i, else |i - j| < w), normalised per row; a row with no allowed key
    (all key weights 0) returns 0.  P has the given coefficients (default Taylor of exp of ``degree``)
    and must be positive on the whole real line.  If S < min_seq_len, exact softmax attention with the
    same masks is computed instead (faster for short sequences).  Output dtype = q.dtype; features and
    accumulation in float32.
    """
    validate_arguments(q, k, v, scale=scale, causal=causal, key_weight=key_weight, alibi_slopes=alibi_slopes,
              window=window)
    coeffs = validate_polynomial(degree, coefficients)
    L, S = q.shape[2], k.shape[2]
    if window and window >= max(L, S):
        window = 0  # the window covers everything
    if S < min_seq_len:
        return exact_attention(q, k, v, scale=scale, causal=causal, key_weight=key_weight,
                               alibi_slopes=alibi_slopes, window=window)
    keep_states = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return _poly_attention_op(q, k, v, key_weight, alibi_slopes, float(scale), list(coeffs), bool(causal),
                              int(window), keep_states)[0]


def exact_attention(q, k, v, *, scale: float, causal: bool = False, key_weight=None, alibi_slopes=None,
                    window: int = 0) -> torch.Tensor:
    """Exact softmax attention (SDPA) with poly_attention's mask semantics; fully masked rows -> 0."""
    B, Hq, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    gqa = Hq != Hk
    if key_weight is None and alibi_slopes is None and not window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    i = torch.arange(L, device=q.device).unsqueeze(-1)
    j = torch.arange(S, device=q.device).unsqueeze(0)
    valid = allowed_keys(i, S, causal, window)
    bdt = compute_dtype(q)
    bias = torch.zeros(1, 1, L, S, dtype=bdt, device=q.device)
    if alibi_slopes is not None:
        bias = bias + alibi_slopes.to(bdt).reshape(1, Hq, 1, 1) * (j - i).to(bdt)
    valid = valid.reshape(1, 1, L, S)
    if key_weight is not None:
        kw = key_weight.to(bdt).reshape(B, 1, 1, S)
        valid = valid & (kw > 0)
        bias = bias + torch.log(kw.clamp_min(1e-38))
    bias = bias.masked_fill(~valid, float("-inf"))
    any_valid = valid.any(-1, keepdim=True)
    bias = torch.where(any_valid, bias, torch.zeros_like(bias))  # avoid NaN; zeroed below
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale, enable_gqa=gqa)
    return out * any_valid.to(out.dtype)
