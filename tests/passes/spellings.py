"""Attention programs written the ways real code writes them: (name, fn, inputs, expected facts).

Each entry exists for a spelling seen in a real model; the comment says which.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

B, H, T, D = 2, 3, 8, 4


def qkv(L: int = T, S: int = T, d: int = D, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, d, generator=g), torch.randn(B, H, S, d, generator=g), torch.randn(B, H, S, d, generator=g))


def causal_bool(L: int = T) -> torch.Tensor:
    return torch.tril(torch.ones(L, L, dtype=torch.bool))


# nanoGPT / minGPT: q @ k.transpose(-2, -1) * (1/sqrt(d))
def matmul_mul(q, k, v):
    return torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1))), dim=-1) @ v


# "Attention is all you need" tutorials: torch.matmul(...) / sqrt(d)
def matmul_div(q, k, v):
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.size(-1))
    return torch.matmul(F.softmax(scores, dim=-1), v)


# pre-scaled queries (fairseq, HF T5-like code that scales q)
def prescaled_q(q, k, v):
    q = q * q.size(-1) ** -0.5
    return (q @ k.mT).softmax(dim=-1) @ v


# unscaled (T5)
def unscaled(q, k, v):
    return F.softmax(q.matmul(k.transpose(-1, -2)), dim=3).matmul(v)


# additive float mask, mask written first (`mask + scores`)
def additive_mask_first(q, k, v, mask):
    return torch.softmax(mask + q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v


# boolean causal mask with masked_fill(-inf)
def masked_fill_causal(q, k, v):
    T_ = q.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    mask = torch.tril(torch.ones(T_, T_, dtype=torch.bool, device=q.device))
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# causal mask with dropout on the weights (train-mode code path, p given)
def with_dropout_p0(q, k, v):
    w = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
    return F.dropout(w, p=0.0, training=True) @ v


# 3-D bmm layout [B*H, T, D] (GPT-2 era, fairseq)
def bmm_3d(q, k, v):
    q3, k3, v3 = (x.reshape(-1, x.size(-2), x.size(-1)) for x in (q, k, v))
    w = torch.bmm(q3, k3.transpose(1, 2)) * 0.5
    return torch.bmm(w.softmax(-1), v3).reshape(q.shape)


# einsum (performer/x-transformers style)
def einsum_form(q, k, v):
    w = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.5
    return torch.einsum("bhqk,bhkd->bhqd", w.softmax(dim=-1), v)


# SDPA calls (HF attn_implementation="sdpa")
def sdpa_plain(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)


def sdpa_bool_causal_mask(q, k, v):
    mask = torch.tril(torch.ones(q.size(-2), k.size(-2), dtype=torch.bool))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


SPELLINGS = [
    # name, fn, extra inputs builder, expected mask kind, expected scale
    ("matmul_mul", matmul_mul, lambda: (), "none", 0.5),
    ("matmul_div", matmul_div, lambda: (), "none", 0.5),
    ("prescaled_q", prescaled_q, lambda: (), "none", 0.5),
    ("unscaled", unscaled, lambda: (), "none", 1.0),
    ("additive_mask_first", additive_mask_first, lambda: (torch.randn(1, 1, T, T),), "dense", 0.5),
    ("masked_fill_causal", masked_fill_causal, lambda: (), "causal", 0.5),
    ("with_dropout_p0", with_dropout_p0, lambda: (), "none", 0.5),
    ("bmm_3d", bmm_3d, lambda: (), "none", 0.5),
    ("einsum_form", einsum_form, lambda: (), "none", 0.5),
    ("sdpa_plain", sdpa_plain, lambda: (), "none", 0.5),
    ("sdpa_causal", sdpa_causal, lambda: (), "causal", 0.3),
    ("sdpa_bool_causal_mask", sdpa_bool_causal_mask, lambda: (), "causal", 0.5),
]


# BLOOM: ALiBi bias and scores in one baddbmm on [B*H, L, S]
def baddbmm_alibi(q, k, v):
    BH, S = q.size(0) * q.size(1), k.size(-2)
    q3, k3, v3 = (x.reshape(BH, x.size(-2), x.size(-1)) for x in (q, k, v))
    slopes = torch.tensor([0.5, 0.25, 0.125]).repeat(q.size(0)).reshape(BH, 1, 1)
    alibi = slopes * torch.arange(S).reshape(1, 1, S).float()
    scores = alibi.baddbmm(q3, k3.transpose(1, 2), beta=1.0, alpha=0.5)
    return torch.bmm(torch.softmax(scores, dim=-1), v3).reshape(q.shape)


SPELLINGS.append(("baddbmm_alibi", baddbmm_alibi, lambda: (), "alibi", 0.5))


# ---------------------------------------------------------------------------------------------------
# Families of spellings the matcher once missed. Each entry: (name, fn, extra inputs builder, expected),
# expected = {"mask": kind, "causal": bool, "scale": float, "method": "exact" | "unchanged", ...}.
# ---------------------------------------------------------------------------------------------------

def keep_mask() -> torch.Tensor:
    """[B, S] bool padding: the second sequence has its last two keys padded."""
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, -2:] = False
    return keep


def causal_additive(L: int = T) -> torch.Tensor:
    """HF-style float mask [1, 1, L, L]: 0 where allowed, finfo.min elsewhere (built in the forward)."""
    allowed = torch.tril(torch.ones(L, L, dtype=torch.bool))
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]


# 1. Dead uses of intermediates: introspection copies nothing reads (Dynamo keeps them in the graph).

def dead_clone_scores(q, k, v):  # a debug copy of the scaled scores
    s = q @ k.transpose(-2, -1) * 0.5
    dbg = s.clone()  # noqa: F841
    return torch.softmax(s, dim=-1) @ v


def dead_detach_weights(q, k, v):  # `self.attn_probs = probs.detach()` minus the store: a local never read
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1)
    probs_for_vis = w.detach()  # noqa: F841
    return w @ v


def dead_float_cpu_copy(q, k, v):  # an fp32 copy moved to the CPU for logging, never read
    w = F.softmax(q @ k.mT * 0.5, dim=-1)
    logged = w.float().cpu()  # noqa: F841
    return torch.matmul(w, v)


def dead_stats_no_grad(q, k, v):  # attention entropy computed without grad, never read
    s = (q @ k.transpose(-2, -1)) * 0.5
    w = s.softmax(-1)
    with torch.no_grad():
        entropy = -(w * w.clamp_min(1e-9).log()).sum(-1).mean()  # noqa: F841
    return w @ v


def dead_copies_on_masked_scores(q, k, v):  # copies of the masked scores and of the max logit
    s = q @ k.transpose(-2, -1) * 0.5
    s = s.masked_fill(~causal_bool(q.size(-2)), float("-inf"))
    snapshot = s.detach().clone()  # noqa: F841
    max_logit = s.amax(dim=-1)  # noqa: F841
    return torch.softmax(s, dim=-1) @ v


def dead_copy_of_both(q, k, v):  # a scores copy and a weights copy, through casts
    s = torch.matmul(q, k.transpose(2, 3)) / 2.0
    _ = s.to(torch.float32).clone()
    w = torch.softmax(s.float(), dim=-1).to(q.dtype)
    _ = w.detach().to(torch.float32)
    return torch.matmul(w, v)


DEAD_USES = [
    ("dead_clone_scores", dead_clone_scores, lambda: (), {"mask": "none", "scale": 0.5}),
    ("dead_detach_weights", dead_detach_weights, lambda: (), {"mask": "none", "scale": 0.5}),
    ("dead_float_cpu_copy", dead_float_cpu_copy, lambda: (), {"mask": "none", "scale": 0.5}),
    ("dead_stats_no_grad", dead_stats_no_grad, lambda: (), {"mask": "none", "scale": 0.5}),
    ("dead_copies_on_masked_scores", dead_copies_on_masked_scores, lambda: (),
     {"mask": "causal", "causal": True, "scale": 0.5}),
    ("dead_copy_of_both", dead_copy_of_both, lambda: (), {"mask": "none", "scale": 0.5}),
]


# ... and uses that are not dead, or not removable: these stay near misses, with the use named.

class StoresWeights(torch.nn.Module):  # `self.attn_weights = w.detach()`: Dynamo returns it to store it
    def forward(self, q, k, v):
        w = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
        self.attn_weights = w.detach()
        return w @ v


def returns_scores(q, k, v):  # `output_attentions=True`-style: the scores are an output
    s = q @ k.transpose(-2, -1) * 0.5
    return torch.softmax(s, dim=-1) @ v, s.detach()


def mutates_dead_clone(q, k, v):  # an in-place op on a private copy nothing reads: dead (out-of-place, then erased)
    w = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
    c = w.clone()
    c.mul_(2.0)
    return w @ v



def dropout_on_dead_copy(q, k, v):  # a random op draws from the RNG even when unused: kept
    w = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
    _ = F.dropout(w, p=0.1, training=True)
    return w @ v


def mutates_scores_view(q, k, v):  # an in-place op on a view of the scores writes through: a live use
    s = q @ k.transpose(-2, -1) * 0.5
    s[..., 0].mul_(2.0)
    return torch.softmax(s, dim=-1) @ v


LIVE_USES = [  # name, fn, extra, a word the near-miss reason must contain
    ("stores_weights", StoresWeights(), lambda: (), "graph output"),
    ("returns_scores", returns_scores, lambda: (), "graph output"),
    ("mutates_scores_view", mutates_scores_view, lambda: (), "getitem"),
    ("dropout_on_dead_copy", dropout_on_dead_copy, lambda: (), "dropout"),
]


# 2. Layout changes between the score matmul, the softmax and the value matmul (merged B*H).

def alibi_merged(q) -> torch.Tensor:
    """BLOOM's ALiBi bias [B*H, 1, S]: per-head slope times the key position (built in the forward)."""
    heads, S = q.size(1), q.size(-2)
    slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(heads)])
    return (slopes[:, None, None] * torch.arange(S)[None, None, :].float()).repeat(q.size(0), 1, 1)


def bloom_baddbmm_views(q, k, v):  # HF BLOOM: baddbmm over [B*H], view to [B, H] for the mask, view back
    B_, H_, L_, D_ = q.shape
    q3, k3, v3 = q.reshape(B_ * H_, -1, D_), k.reshape(B_ * H_, -1, D_).transpose(-1, -2), v.reshape(B_ * H_, -1, D_)
    scores = alibi_merged(q).baddbmm(batch1=q3, batch2=k3, beta=1.0, alpha=1.0 / math.sqrt(D_))
    w = scores.view(B_, H_, L_, -1) + causal_additive(L_)
    probs = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, 0.0, True, False)
    context = torch.bmm(probs.view(B_ * H_, L_, -1), v3)
    return context.view(B_, H_, L_, D_).permute(0, 2, 1, 3).reshape(B_, L_, H_ * D_)


def torch_baddbmm_probs_to_4d(q, k, v):  # torch.baddbmm(bias, q, k^T): weights viewed to [B, H] for @ v
    B_, H_, L_, D_ = q.shape
    q3, k3 = q.flatten(0, 1), k.flatten(0, 1)
    scores = torch.baddbmm(alibi_merged(q), q3, k3.transpose(1, 2), beta=1.0, alpha=0.5)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs.reshape(B_, H_, L_, -1) @ v


def bmm_probs_view_4d(q, k, v):  # scores and softmax over [B*H], weights viewed to [B, H, L, S]
    B_, H_, L_, D_ = q.shape
    q3, k3 = q.reshape(B_ * H_, L_, D_), k.reshape(B_ * H_, -1, D_)
    w = torch.bmm(q3, k3.transpose(1, 2)) * 0.5
    return w.softmax(-1).view(B_, H_, L_, -1) @ v


def bmm_scores_view_masked(q, k, v):  # 3-D scores viewed to 4-D for a causal masked_fill, then back
    B_, H_, L_, D_ = q.shape
    q3, k3, v3 = (x.reshape(-1, x.size(-2), x.size(-1)) for x in (q, k, v))
    s = (torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(D_)).view(B_, H_, L_, L_)
    s = s.masked_fill(~causal_bool(L_), float("-inf"))
    w = torch.softmax(s, dim=-1).reshape(B_ * H_, L_, L_)
    return torch.bmm(w, v3).reshape(B_, H_, L_, D_)


def flatten_probs_unflatten(q, k, v):  # 4-D scores, weights flattened for bmm, output unflattened
    w = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
    out = torch.bmm(w.flatten(0, 1), v.flatten(0, 1))
    return out.unflatten(0, (q.size(0), q.size(1)))


def merged_key_padding(q, k, v, keep):  # a data padding mask expanded over heads to [B*H, 1, S]
    B_, H_, L_, D_ = q.shape
    q3, k3, v3 = (x.reshape(B_ * H_, -1, D_) for x in (q, k, v))
    pad = torch.where(keep, 0.0, float("-inf"))[:, None, None, :].expand(B_, H_, 1, -1).reshape(B_ * H_, 1, -1)
    w = torch.softmax(torch.bmm(q3, k3.transpose(1, 2)) * 0.5 + pad, dim=-1)
    return torch.bmm(w, v3).view(B_, H_, L_, D_)


def merged_gqa(q, k, v):  # grouped-query kv repeated to the query heads, then merged with the batch
    B_, H_, L_, D_ = q.shape
    k2, v2 = k[:, :1], v[:, :1]  # one kv head shared by all query heads
    k_rep = k2[:, :, None].expand(B_, 1, H_, L_, D_).reshape(B_, H_, L_, D_)
    v_rep = v2[:, :, None].expand(B_, 1, H_, L_, D_).reshape(B_, H_, L_, D_)
    q3, k3, v3 = q.reshape(B_ * H_, L_, D_), k_rep.reshape(B_ * H_, L_, D_), v_rep.reshape(B_ * H_, L_, D_)
    w = torch.bmm(q3, k3.transpose(1, 2)).mul(0.5).view(B_, H_, L_, L_).softmax(-1)
    return torch.bmm(w.view(B_ * H_, L_, L_), v3)


LAYOUTS = [
    ("bloom_baddbmm_views", bloom_baddbmm_views, lambda: (), {"mask": "alibi", "causal": True, "scale": 0.5,
                                                             "alibi_heads": H}),
    ("torch_baddbmm_probs_to_4d", torch_baddbmm_probs_to_4d, lambda: (), {"mask": "alibi", "scale": 0.5,
                                                                         "alibi_heads": H}),
    ("bmm_probs_view_4d", bmm_probs_view_4d, lambda: (), {"mask": "none", "scale": 0.5}),
    ("bmm_scores_view_masked", bmm_scores_view_masked, lambda: (), {"mask": "causal", "causal": True, "scale": 0.5}),
    ("flatten_probs_unflatten", flatten_probs_unflatten, lambda: (), {"mask": "none", "scale": 0.5}),
    ("merged_key_padding", merged_key_padding, lambda: (keep_mask(),), {"mask": "key_padding", "scale": 0.5}),
    ("merged_gqa", merged_gqa, lambda: (), {"mask": "none", "scale": 0.5, "gqa": H}),
]


# 3. Score transforms neither SDPA nor the polynomial op applies: sites kept as written.

def softcap_gemma2(q, k, v):  # HF Gemma-2 eager: scale, / cap, tanh, * cap, + additive mask, fp32 softmax
    cap = 20.0
    s = torch.matmul(q, k.transpose(2, 3)) * q.size(-1) ** -0.5
    s = s / cap
    s = torch.tanh(s)
    s = s * cap
    s = s + causal_additive(q.size(-2))
    w = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(w, p=0.0, training=False), v)


def softcap_where_causal(q, k, v):  # where(causal, cap * tanh(s / cap), min)
    s = q @ k.transpose(-2, -1) * 0.5
    s = torch.where(causal_bool(q.size(-2)), 30.0 * torch.tanh(s / 30.0), torch.finfo(s.dtype).min)
    return torch.softmax(s, dim=-1) @ v


def softcap_method_key_padding(q, k, v, keep):  # s.div(c).tanh().mul(c), then a data padding masked_fill
    s = (q @ k.mT * 0.5).div(50.0).tanh().mul(50.0)
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return s.softmax(dim=-1) @ v


def softcap_inverse_mul(q, k, v):  # tanh(s * (1 / c)) * c (Grok-1 style), no mask
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.5
    s = torch.tanh(s * (1.0 / 30.0)) * 30.0
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def softcap_functional_tanh_arange(q, k, v):  # F.tanh and an arange-built causal masked_fill
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    s = F.tanh(s / 10.0) * 10.0
    i = torch.arange(q.size(-2))
    s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
    return torch.softmax(s, -1) @ v


def clamp_window(q, k, v):  # a hard cap (clamp) with a causal sliding window
    s = (q @ k.transpose(-2, -1) * 0.5).clamp(-5.0, 5.0)
    i = torch.arange(q.size(-2))
    s = s.masked_fill((i[None, :] > i[:, None]) | (i[None, :] <= i[:, None] - 3), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def softcap_mask_inside(q, k, v):  # a mask added *before* the cap is bounded by it: no key is removed
    s = q @ k.transpose(-2, -1) * 0.5 + causal_additive(q.size(-2))
    s = torch.tanh(s / 20.0) * 20.0
    return torch.softmax(s, dim=-1) @ v


TRANSFORMS = [
    ("softcap_gemma2", softcap_gemma2, lambda: (), {"mask": "causal", "causal": True, "scale": 0.5,
                                                   "transform": "soft-capped scores (tanh(s / 20) * 20)"}),
    ("softcap_where_causal", softcap_where_causal, lambda: (), {"mask": "causal", "causal": True, "scale": 0.5,
                                                               "transform": "soft-capped scores (tanh(s / 30) * 30)"}),
    ("softcap_method_key_padding", softcap_method_key_padding, lambda: (keep_mask(),),
     {"mask": "key_padding", "scale": 0.5, "transform": "soft-capped scores (tanh(s / 50) * 50)"}),
    ("softcap_inverse_mul", softcap_inverse_mul, lambda: (), {"mask": "none", "scale": 0.5,
                                                             "transform": "soft-capped scores (tanh(s / 30) * 30)"}),
    ("softcap_functional_tanh_arange", softcap_functional_tanh_arange, lambda: (),
     {"mask": "causal", "causal": True, "scale": 0.5, "transform": "soft-capped scores (tanh(s / 10) * 10)"}),
    ("clamp_window", clamp_window, lambda: (), {"mask": "causal+window", "causal": True, "scale": 0.5,
                                               "transform": "clamped scores (clamp(s, -5, 5))"}),
    ("softcap_mask_inside", softcap_mask_inside, lambda: (), {"mask": "dense", "scale": 0.5,
                                                             "transform": "soft-capped scores (tanh(s / 20) * 20)"}),
]
for _entry in TRANSFORMS:
    _entry[3]["method"] = "unchanged"

FAMILIES = {"dead_uses": DEAD_USES, "layouts": LAYOUTS, "transforms": TRANSFORMS}


def softcap_merged_heads(q, k, v):  # soft-cap on [B*H] scores viewed to [B, H] for a causal mask
    B_, H_, L_, D_ = q.shape
    q3, k3, v3 = (x.reshape(B_ * H_, L_, D_) for x in (q, k, v))
    s = torch.tanh(torch.bmm(q3, k3.transpose(1, 2)) * 0.5 / 15.0) * 15.0
    s = s.view(B_, H_, L_, L_).masked_fill(~causal_bool(L_), float("-inf"))
    return torch.bmm(s.softmax(-1).view(B_ * H_, L_, L_), v3)


TRANSFORMS.append(("softcap_merged_heads", softcap_merged_heads, lambda: (),
                   {"mask": "causal", "causal": True, "scale": 0.5, "method": "unchanged",
                    "transform": "soft-capped scores (tanh(s / 15) * 15)"}))
