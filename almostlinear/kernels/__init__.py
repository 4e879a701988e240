"""The attention ops: polynomial (low-rank) attention with an analytic backward.

Public API::

    MASK_KINDS                       structured mask kinds the op covers
    taylor_coefficients(degree)      (1, 1, 1/2, ...) Taylor coefficients of exp
    poly_attention(q, k, v, *, scale, degree=2, coefficients=None, causal=False, key_weight=None,
                   alibi_slopes=None, window=0, min_seq_len=0)             -> [B, Hq, L, Dv]
    naive_poly_attention(...)        the reference (materialises [L, S])
    exact_attention(...)             exact softmax with the same mask semantics (SDPA)
    DEFAULT_MIN_SEQ_LEN[_CAUSAL], default_min_seq_len(device, causal=False)   measured crossovers

Op: torch.ops.almostlinear.poly_attention (+ poly_attention_backward). See op.py for dispatch.
"""
from .features import feature_rank, taylor_coefficients, validate_polynomial
from .naive import naive_exact_attention, naive_poly_attention
from .op import (DEFAULT_MIN_SEQ_LEN, DEFAULT_MIN_SEQ_LEN_CAUSAL, MASK_KINDS, default_min_seq_len,
                 exact_attention, mask_kind, poly_attention)

__all__ = ["MASK_KINDS", "taylor_coefficients", "validate_polynomial", "feature_rank", "poly_attention",
           "naive_poly_attention", "naive_exact_attention", "exact_attention", "DEFAULT_MIN_SEQ_LEN",
           "DEFAULT_MIN_SEQ_LEN_CAUSAL", "default_min_seq_len", "mask_kind"]
