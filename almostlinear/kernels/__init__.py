"""The attention ops: polynomial (low-rank) attention with an analytic backward.

Public API::

    poly_attention(q, k, v, *, scale, degree=2, coefficients=None, causal=False, key_weight=None,
                   alibi_slopes=None, window=0, min_seq_len=0)             -> [B, Hq, L, Dv]
    poly_window_attention(q, k, v, *, scale, exact_window, ...)   exp(s) on the nearest keys, P(s) on the others
    key_state(k, v, ...), poly_state_attention(q, k, v, ext_values, ext_moments, ...)   context parallelism: a
                                     rank's key state, and its queries against its keys plus an external state
    naive_poly_attention(...)        the reference (materialises [L, S]); naive_window_attention likewise
    exact_attention(...)             exact softmax with the same mask semantics (SDPA)
    naive_exact_attention(...)       its reference
    taylor_coefficients(degree)      (1, 1, 1/2, ...) Taylor coefficients of exp
    validate_polynomial(degree, coefficients)      the coefficients, checked to give P(s) > 0 for all real s
    evaluate_polynomial(s, coefficients)           P(s) = c_0 + c_1 s + c_2 s^2 + ... (Horner)
    feature_rank(d, degree)          C(d + degree, degree), the packed feature rank
    mask_kind(causal, key_weight, alibi_slopes, window)   the kinds.MaskKind of an argument combination
    allowed_keys(query_index, S, causal, window)          [m, S] bool: the keys each query sees
    DEFAULT_MIN_SEQ_LEN[_CAUSAL], default_min_seq_len(device, causal=False)   measured crossovers

Op: torch.ops.almostlinear.poly_attention (+ poly_attention_backward). See op.py for dispatch; the kernels
are cpu/ (chunked torch path, any device) and triton/ (CUDA, degree 2); switchable.py holds the op that
switches a site between polynomial and exact attention at run time.
"""
from .features import evaluate_polynomial, feature_rank, taylor_coefficients, validate_polynomial
from .key_mask import allowed_keys
from .naive import naive_exact_attention, naive_poly_attention, naive_window_attention
from .op import (DEFAULT_MIN_SEQ_LEN, DEFAULT_MIN_SEQ_LEN_CAUSAL, default_min_seq_len, drop_masked_keys,
                 exact_attention, mask_kind, poly_attention)
from .exact_window import poly_window_attention
from .context_parallel import key_state, poly_state_attention

__all__ = ["taylor_coefficients", "validate_polynomial", "evaluate_polynomial", "feature_rank", "poly_attention",
           "naive_poly_attention", "naive_exact_attention", "exact_attention", "DEFAULT_MIN_SEQ_LEN",
           "DEFAULT_MIN_SEQ_LEN_CAUSAL", "default_min_seq_len", "mask_kind", "allowed_keys", "drop_masked_keys",
           "poly_window_attention", "naive_window_attention", "key_state", "poly_state_attention"]
