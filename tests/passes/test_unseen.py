"""Third-party attention spellings the matcher once missed or misclassified (issue 25, "Unseen code").

One small module per spelling, written the way the third-party code writes it. Each is either recognised
(the site is found, its mask classified, the exact rewrite equals eager in outputs and gradients, and the
polynomial rewrite equals the reference polynomial attention on the same q, k, v) or kept as written with a
near-miss reason that says why.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import almostlinear
from almostlinear.kernels.naive import naive_poly_attention
from tests.oracle import assert_exact_oracle

B, H, L, D = 2, 2, 8, 4


def _qkv(*shape, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = shape or (B, H, L, D)
    return [torch.randn(*shape, generator=g, dtype=dtype) for _ in range(3)]


def _keep(length: int = L) -> torch.Tensor:
    """[B, S] padding: the second sequence has its last three keys padded."""
    keep = torch.ones(B, length, dtype=torch.bool)
    keep[1, -3:] = False
    return keep


def _one_site(report, kind: str):
    assert len(report.sites) == 1 and not report.near_misses, str(report)
    site = report.sites[0]
    assert site.mask_kind == kind and site.rewritten and site.method == "exact", str(report)
    return site


def _polynomial(fn, inputs):
    """method="polynomial" on every site: the output and the report's row."""
    torch._dynamo.reset()
    backend = almostlinear.Backend(method="polynomial", min_seq_len=0, inner="aot_eager")
    with torch.no_grad():
        out = torch.compile(fn, backend=backend)(*inputs)
    site = backend.reports[-1].sites[0]
    assert site.method == "polynomial", str(backend.reports[-1])
    return out, site


def _reference(site, q, k, v, **kw):
    """The polynomial attention the row says it computes, materialised (kernels/naive.py)."""
    coefficients = list(site.coefficients) if site.coefficients else None
    return naive_poly_attention(q, k, v, degree=site.degree, coefficients=coefficients, **kw)


def _near_miss(fn, inputs) -> str:
    report = assert_exact_oracle(fn, inputs)  # kept as written: still equal to eager
    assert not report.sites and len(report.near_misses) == 1, str(report)
    return report.near_misses[0].reason


# ---------------------------------------------------------------------------------------------------
# ALiBi as a bias tensor [H, 1, S] plus a causal fill (MPT: m * (j - (S - 1)), far keys below -200)
# ---------------------------------------------------------------------------------------------------

SLOPES = (1.0, 0.0625)


class MptAlibi(nn.Module):  # MPT build_alibi_bias + masked_fill of the causal mask with finfo.min
    def __init__(self, length: int):
        super().__init__()
        bias = torch.arange(1 - length, 1, dtype=torch.int32).view(1, 1, 1, length)
        self.register_buffer("attn_bias", bias * torch.tensor(SLOPES).view(1, -1, 1, 1))

    def forward(self, q, k, v):
        s_q, s_k = q.size(-2), k.size(-2)
        attn = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(q.size(-1))) + self.attn_bias[:, :, :, -s_k:]
        causal = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril().logical_not()
        attn = attn.masked_fill(causal.view(1, 1, s_q, s_k), torch.finfo(q.dtype).min)
        return torch.softmax(attn, dim=-1) @ v


def test_alibi_bias_tensor_with_causal_fill_is_alibi():
    n = 256  # the first head's bias reaches -255: a bias, not a blocking value
    q, k, v = _qkv(1, H, n, D)
    site = _one_site(assert_exact_oracle(MptAlibi(n), (q, k, v), expect_sites=1), "alibi")
    assert site.causal
    out, row = _polynomial(MptAlibi(n), (q, k, v))
    ref = _reference(row, q, k, v, scale=D ** -0.5, causal=True, alibi_slopes=torch.tensor(SLOPES))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Windows: a sliding window ANDed with key padding; a bidirectional window |i - j| <= w
# ---------------------------------------------------------------------------------------------------


class SlidingPadded(nn.Module):  # sliding-window layers on a padded batch (Mistral/Gemma-style eager code)
    def forward(self, q, k, v, keep):
        i = torch.arange(q.size(-2))[:, None]
        j = torch.arange(k.size(-2))[None, :]
        allowed = (j <= i) & (j > i - 3) & keep[:, None, None, :]
        scores = (q @ k.transpose(-2, -1)) * 0.5
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        return F.softmax(scores, dim=-1) @ v


class LocalEncoder(nn.Module):  # a local encoder layer: |i - j| <= w, optionally with key padding
    def __init__(self, w: int, padded: bool):
        super().__init__()
        self.w, self.padded = w, padded

    def forward(self, q, k, v, keep):
        i = torch.arange(q.size(-2))[:, None]
        j = torch.arange(k.size(-2))[None, :]
        allowed = (i - j).abs() <= self.w
        fill = float("-inf")
        if self.padded:  # (finfo.min as HF writes it: eager is finite on the rows that see only padding)
            allowed, fill = allowed & keep[:, None, None, :], torch.finfo(q.dtype).min
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        return scores.masked_fill(~allowed, fill).softmax(-1) @ v


def test_sliding_window_with_key_padding_is_a_window():
    site = _one_site(assert_exact_oracle(SlidingPadded(), (*_qkv(), _keep()), expect_sites=1), "causal+window")
    assert site.causal and site.window == 3  # (batch 1's last row sees only padded keys: eager's value kept)


@pytest.mark.parametrize("model, scale, causal, window", [(SlidingPadded(), 0.5, True, 3),
                                                         (LocalEncoder(2, True), D ** -0.5, False, 3)],
                         ids=["sliding", "bidirectional"])
def test_window_with_key_padding_keeps_eager_rows_under_polynomial(model, scale, causal, window):
    """A row whose band holds only padded keys (batch 1, last row) is empty although its sequence has keys: the
    empty-row fix-up finds it from the kept keys counted over each band and gives it eager's value; the other
    rows are the polynomial attention the report says (the naive reference)."""
    torch._dynamo.reset()
    q, k, v = _qkv()
    keep = _keep()
    out, row = _polynomial(model, (q, k, v, keep))
    assert row.method == "polynomial", row.reason
    expected = _reference(row, q, k, v, scale=scale, causal=causal, window=window, key_weight=keep.float())
    i = torch.arange(L)
    band = (i[None, :] - i[:, None]).abs() < window
    band = band & (i[None, :] <= i[:, None]) if causal else band
    empty = ~(band[None] & keep[:, None, :]).any(-1)  # [B, L]
    assert bool(empty.any()) and bool((~empty).any())
    eager = model(q, k, v, keep)
    rows = empty[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[rows], eager[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[~rows], expected[~rows], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("w", [2, 5])  # 5: a window wider than half the length
def test_bidirectional_window_is_a_window(w):
    q, k, v = _qkv()
    site = _one_site(assert_exact_oracle(LocalEncoder(w, False), (q, k, v, _keep()), expect_sites=1), "window")
    assert not site.causal and site.window == w + 1  # the op's window: |i - j| < window
    out, row = _polynomial(LocalEncoder(w, False), (q, k, v, _keep()))
    torch.testing.assert_close(out, _reference(row, q, k, v, scale=D ** -0.5, window=w + 1), atol=1e-4, rtol=1e-4)


def test_bidirectional_window_with_key_padding_is_a_window():
    site = _one_site(assert_exact_oracle(LocalEncoder(2, True), (*_qkv(), _keep()), expect_sites=1), "window")
    assert site.window == 3


# ---------------------------------------------------------------------------------------------------
# Scale factors: a learned per-head temperature, cosine attention, a 0-d tensor on the key operand
# ---------------------------------------------------------------------------------------------------


class Temperature(nn.Module):  # a learned temperature per head [H, 1, 1] (XCiT-style)
    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor([0.7, 1.6]).view(H, 1, 1))

    def forward(self, q, k, v):
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        return attn.softmax(dim=-1) @ v


class Cosine(nn.Module):  # Swin-v2 cosine attention: normalised q, k times exp(clamped logit_scale)
    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(H, 1, 1)))

    def forward(self, q, k, v):
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        return F.softmax(attn * logit_scale, dim=-1) @ v


class KeyScaled(nn.Module):  # the scale on the key operand, a 0-d tensor
    def forward(self, q, k, v):
        scale = torch.tensor(math.sqrt(q.size(-1)))
        return F.softmax(q @ (k.transpose(-2, -1) / scale), dim=-1) @ v


def test_per_head_temperature_is_folded_into_q():
    model, (q, k, v) = Temperature(), _qkv()
    report = assert_exact_oracle(model, (q, k, v), expect_sites=1)  # the temperature's gradient included
    assert _one_site(report, "none").scale is None  # not one constant: a tensor factor
    out, row = _polynomial(model, (q, k, v))  # calibrated and computed on the scaled q
    ref = _reference(row, q * model.temperature.detach(), k, v, scale=1.0)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_cosine_attention_is_found():
    _one_site(assert_exact_oracle(Cosine(), _qkv(), expect_sites=1), "none")


def test_scale_on_the_key_operand_is_found():
    q, k, v = _qkv()
    _one_site(assert_exact_oracle(KeyScaled(), (q, k, v), expect_sites=1), "none")
    out, row = _polynomial(KeyScaled(), (q, k, v))
    torch.testing.assert_close(out, _reference(row, q / math.sqrt(D), k, v, scale=1.0), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Spellings of single ops: type_as, einsum on [B, L, H, d], an in-place masked_fill_
# ---------------------------------------------------------------------------------------------------


class TypeAs(nn.Module):  # softmax in float32, cast back with type_as (lucidrains-style)
    def forward(self, q, k, v):
        sim = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
        attn = sim.float().softmax(dim=-1).type_as(sim)
        return attn @ v


class EinsumBLHD(nn.Module):  # einsums on the [B, L, H, d] layout
    def forward(self, q, k, v):
        scores = torch.einsum("...qhd,...khd->...hqk", q, k) * 0.5
        return torch.einsum("...hqk,...khd->...qhd", scores.softmax(dim=-1), v)


class InPlaceFill(nn.Module):  # the mask applied in place on the scores
    def forward(self, q, k, v, keep):
        sim = q @ k.transpose(-2, -1) * 0.5
        sim.masked_fill_(~keep[:, None, None, :], -torch.finfo(sim.dtype).max)
        return sim.softmax(dim=-1) @ v


def test_type_as_after_float32_softmax_is_a_cast():
    _one_site(assert_exact_oracle(TypeAs(), _qkv(dtype=torch.float64), expect_sites=1), "none")


def test_einsum_on_blhd_layout_is_found():
    q, k, v = (x.transpose(1, 2) for x in _qkv())  # [B, L, H, d]
    report = assert_exact_oracle(EinsumBLHD(), (q, k, v), expect_sites=1)
    site = _one_site(report, "none")
    assert site.q_shape == (B, H, L, D) and "einsum" not in report.graph_after
    out, row = _polynomial(EinsumBLHD(), (q, k, v))
    ref = _reference(row, *(x.transpose(1, 2) for x in (q, k, v)), scale=0.5).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_in_place_masked_fill_is_a_mask():
    _one_site(assert_exact_oracle(InPlaceFill(), (*_qkv(), _keep()), expect_sites=1), "key_padding")


# ---------------------------------------------------------------------------------------------------
# Kept as written, with the reason: attention sinks, banded local attention, probabilities returned
# ---------------------------------------------------------------------------------------------------


class Sinks(nn.Module):  # gpt-oss eager attention: a learned sink logit per head, sliced off before @ v
    def __init__(self):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(H))

    def forward(self, q, k, v):
        attn = (q @ k.transpose(-2, -1)) * 0.5
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        combined = torch.cat([attn, sinks], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1, dtype=combined.dtype)
        return probs[..., :-1] @ v


class Banded(nn.Module):  # local attention in a banded layout: keys and values unfolded into 2w + 1 windows
    def forward(self, q, k, v, w: int = 2):
        kb = F.pad(k, (0, 0, w, w)).unfold(2, 2 * w + 1, 1).transpose(-1, -2)  # [B, H, L, 2w + 1, D]
        vb = F.pad(v, (0, 0, w, w)).unfold(2, 2 * w + 1, 1).transpose(-1, -2)
        sim = torch.einsum("bhld,bhlwd->bhlw", q, kb) * 0.5
        return torch.einsum("bhlw,bhlwd->bhld", sim.softmax(dim=-1), vb)


class KeepsProbs(nn.Module):  # probabilities kept for inspection: returned with the output
    def forward(self, q, k, v):
        probs = (q @ k.transpose(-2, -1) * 0.5).softmax(dim=-1)
        return probs @ v, probs


def test_attention_sinks_are_a_near_miss_that_says_so():
    assert _near_miss(Sinks(), _qkv()).startswith("attention sinks: the softmax runs over the scores and an extra "
                                                  "logit column")


def test_banded_local_attention_is_a_near_miss_that_says_so():
    reason = _near_miss(Banded(), _qkv())
    assert reason.startswith("local attention in a banded layout: keys/values are unfolded into windows of 5"), reason


def test_returned_probabilities_are_a_near_miss_that_says_so():
    reason = _near_miss(KeepsProbs(), _qkv())
    assert reason == "attention weights are used outside the site: also read by the graph output", reason
