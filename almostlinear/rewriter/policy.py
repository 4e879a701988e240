"""Policy: what each site may become, from the options and what the matcher proved (no measurement).

    decide(site, row, options) -> Decision(method, reason, degree, coefficients, min_seq_len)

Order: a score transform the fused ops cannot apply keeps the site as written; a `sites` glob (last match
wins) forces skip / exact / polynomial; method="exact" keeps every site exact; otherwise the polynomial op
is chosen where it supports the site (mask kind, 4-D layout, no dropout, per-head ALiBi, key-mask shape) and
the key length reaches the crossover (`min_seq_len_for`). Sites inside a checkpointed region stay exact (the
budget search could not measure them). Calibration and the budget search may still move a site to exact.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..kernels import default_min_seq_len
from ..kinds import Choice, MaskKind, Method
from ..passes.graph_utils import concrete_int, shape_of, tensor_meta
from ..passes.site import AttentionSite
from ..passes.rewrite import dropout_active
from ..passes.rewrite_polynomial import alibi_per_query_head, is_dynamic_length
from .options import Options
from .report import Site

# fp32 on CUDA has no flash kernel: measured with benchmarks/gpu_e2e.py on an H200 (GPT, d=64, causal), a
# training step through the op is 0.86x at 8k, 1.6x at 16k, 2.8x at 32k; the crossover table is for bf16 flash.
CUDA_FP32_MIN_SEQ_LEN = 12288


@dataclass(frozen=True)
class Decision:
    method: Method
    reason: str
    degree: int | None = None
    coefficients: tuple[float, ...] | None = None  # None: Taylor coefficients of exp
    min_seq_len: int | None = None  # the op runs from this key length on (dynamic lengths: decided at run time)
    heads: tuple[int, ...] | None = None  # the key/value heads the op computes (None: all); exact on the others
    guard: tuple[float, ...] | None = None  # per key/value head: the logit bound above which a call runs exact
    exact_window: int = 0  # exact softmax on each query's nearest keys (kernels/exact_window.py); 0: none


def site_override(module_path: str, options: Options) -> tuple[str, Choice] | None:
    """The `sites` option entry matching this module path (the last matching glob wins)."""
    found = None
    for pattern, choice in options.sites.items():
        if fnmatch.fnmatchcase(module_path, pattern):
            found = (pattern, choice)
    return found


def decide(site: AttentionSite, row: Site, options: Options) -> Decision:
    """The static decision for one site (its report row gives the module path and the region)."""
    decision = _decide(site, row.module_path, options)
    if decision.method is Method.POLYNOMIAL and row.region:
        return Decision(Method.EXACT, f"fused exact: inside a checkpointed region ({row.region}): the budget "
                                      f"search cannot measure the polynomial op's error inside a checkpoint body "
                                      f"(else: {decision.reason})")
    return decision


def _decide(site: AttentionSite, module_path: str, options: Options) -> Decision:
    if site.score_transform:  # before any option: neither SDPA nor the op computes softmax(f(s))
        return Decision(Method.UNCHANGED, f"kept as written: {site.score_transform}; neither the fused SDPA call "
                                          f"nor the polynomial op applies it")
    override = site_override(module_path, options)
    if override is not None and override[1] is Choice.SKIP:
        return Decision(Method.UNCHANGED, f"left as written: sites option {override[0]!r} = 'skip'")
    if override is not None and override[1] is Choice.EXACT:
        return Decision(Method.EXACT, f"fused exact: sites option {override[0]!r} = 'exact'")
    if options.method is Choice.EXACT and override is None:
        return Decision(Method.EXACT, "fused exact (method='exact')")
    ok, why = polynomial_support(site, options)
    if not ok:
        return Decision(Method.EXACT, f"fused exact: {why}")
    threshold = min_seq_len_for(site, options) if is_dynamic_length(site) else None
    window, why = _exact_window(site, options, why)
    if window < 0:
        return Decision(Method.EXACT, f"fused exact: {why}")
    return Decision(Method.POLYNOMIAL, why, degree=options.degree or 2, min_seq_len=threshold, exact_window=window)


def _exact_window(site: AttentionSite, options: Options, why: str) -> tuple[int, str]:
    """(the site's exact window, the reason): 0 where the option is off or the site is not self-attention (the
    window is defined on query and key positions that coincide); -1 where the window covers every key the site's
    own window lets a query see (then the site is exact attention)."""
    window = options.exact_window
    if not window:
        return 0, why
    q_len, k_len = shape_of(site.q)[-2], shape_of(site.op_kv[0])[-2]
    known = concrete_int(q_len)
    if not (known == concrete_int(k_len) if known is not None else str(q_len) == str(k_len)):
        return 0, f"{why}; no exact window: query length {q_len} and key length {k_len} may differ"
    if site.mask.window and site.mask.window <= window:
        return -1, (f"the exact window ({window} keys) covers the mask's own window ({site.mask.window}): every "
                    f"weight would be exact")
    return window, why


def min_seq_len_for(site: AttentionSite, options: Options) -> int:
    """The key length from which the op is faster than exact attention at this site.

    The crossover tables are measured at head dim 64 (benchmarks/attention.py). By FLOPs it would move as
    d^2; measured on the 2-core CPU (causal, fwd+bwd, 4 heads) it moves about linearly in d: d=16 ~6k,
    d=32 ~8k, d=64 ~16k, so the table value is scaled by d/64.
    """
    if options.min_seq_len is not None:
        return options.min_seq_len
    q = tensor_meta(site.q)
    base = default_min_seq_len(q.device if q is not None else "cpu", causal=site.mask.causal)
    if q is not None and q.device.type == "cuda" and q.dtype == torch.float32:
        base = CUDA_FP32_MIN_SEQ_LEN
    d = concrete_int(q.shape[-1]) if q is not None else 64
    return max(256, int(base * (d or 64) / 64))


def _unsupported(site: AttentionSite, options: Options) -> str | None:
    """Why the op cannot compute this site (None: it can), whatever the key length."""
    if site.score_transform:  # the op computes P(s) of the plain scores: never drop a transform
        return f"the scores pass through a transform the op cannot apply: {site.score_transform}"
    if not MaskKind(site.mask.kind).approximable:
        return f"mask kind {site.mask.kind!r} has no linear-time structure ({site.mask.reason})"
    q_shape = shape_of(site.q)
    if q_shape is None or len(q_shape) != 4:
        return "the polynomial op takes [B, H, T, D] tensors; this site is not 4-D"
    if dropout_active(site) and options.attention_dropout != "remove":
        if isinstance(site.dropout_p, fx.Node):  # dynamic=True: Dynamo passes float attributes as inputs
            return ("dropout's probability is a run-time value here (Dynamo does not specialise floats: "
                    "torch._dynamo.config.specialize_float is False), so it may change without a recompile "
                    "and the op has no dropout; with specialize_float = True a p of 0.0 is a constant")
        return "dropout on the attention weights is not supported by the polynomial op"
    if site.mask.alibi_slopes is not None and alibi_per_query_head(site) is None:
        return (f"the ALiBi bias has {len(site.mask.alibi_slopes)} slopes, not one per query head "
                f"({q_shape[1]}) or one for all")
    if site.mask.empty_rows_possible and site.mask.empty_row_rule not in ("neginf", "uniform", "argmax", "none"):
        return ("rows with every key masked may occur (the mask depends on data) and eager's value on them "
                "depends on how several finite masks combine: kept exact, which gives eager's value")
    for term in site.mask.key_mask:
        shape = shape_of(term.node)
        if shape is None or any(concrete_int(d) != 1 for d in shape[1:-1]):
            return "the key mask differs across heads (the op takes one weight per batch and key)"
    return None


def polynomial_support(site: AttentionSite, options: Options) -> tuple[bool, str]:
    """Whether the op can compute this site and is worth it at its key length, and the reason (kept in the
    report either way)."""
    why = _unsupported(site, options)
    if why is not None:
        return False, why
    length = concrete_int(shape_of(site.op_kv[0])[-2])
    threshold = min_seq_len_for(site, options)
    if length is None:
        return False, "unbacked symbolic key length: the crossover cannot be decided"
    removed = ""
    if dropout_active(site):  # only here with attention_dropout="remove"
        p = site.dropout_p if not isinstance(site.dropout_p, fx.Node) else "a run-time value"
        removed = (f"; attention dropout (p = {p}) REMOVED at this site (attention_dropout='remove'): the model "
                   f"trains without that regularisation")
    if is_dynamic_length(site):
        return True, (f"polynomial where the key length >= min_seq_len {threshold}, exact below (dynamic length: "
                      f"chosen at run time){removed}")
    if length < threshold:
        return False, f"key length {length} < min_seq_len {threshold}: exact attention is faster there"
    return True, f"polynomial (key length {length} >= min_seq_len {threshold}){removed}"


__all__ = ["Decision", "decide", "site_override", "polynomial_support", "min_seq_len_for"]
