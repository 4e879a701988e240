import pytest
import torch

from tests.oracle import assert_exact_oracle

from .spellings import SPELLINGS, qkv


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
@pytest.mark.parametrize("name,fn,extra,mask_kind,scale", SPELLINGS, ids=[s[0] for s in SPELLINGS])
def test_exact_oracle_per_spelling(name, fn, extra, mask_kind, scale, inner):
    report = assert_exact_oracle(fn, (*qkv(), *extra()), inner=inner, expect_sites=1)
    site = report.sites[0]
    assert site.mask_kind == mask_kind, str(report)
    assert site.scale == pytest.approx(scale)
    assert site.method == "exact"
    assert site.causal == (mask_kind == "causal")


@pytest.mark.parametrize("name,fn,extra,mask_kind,scale", SPELLINGS, ids=[s[0] for s in SPELLINGS])
def test_exact_oracle_dynamic_shapes(name, fn, extra, mask_kind, scale):
    report = assert_exact_oracle(fn, (*qkv(), *extra()), inner="aot_eager", dynamic=True, expect_sites=1)
    assert report.sites[0].mask_kind == mask_kind


def test_eager_chain_becomes_one_sdpa_call_with_is_causal():
    report = assert_exact_oracle(SPELLINGS[5][1], qkv(), expect_sites=1)
    assert "scaled_dot_product_attention" in report.graph_after
    assert "is_causal = True" in report.graph_after
    assert "softmax" not in report.graph_after
    assert "masked_fill" not in report.graph_after and "tril" not in report.graph_after


def test_fully_masked_rows_keep_eager_behaviour():
    """A padding mask that removes every key of a row: eager gives NaN there (-inf) or a uniform row (finfo.min)."""

    def padded(q, k, v, keep):  # keep: [B, 1, 1, S] bool from data
        scores = (q @ k.transpose(-2, -1)) * 0.5
        return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ v

    def padded_min(q, k, v, keep):
        scores = (q @ k.transpose(-2, -1)) * 0.5
        return torch.softmax(scores.masked_fill(~keep, torch.finfo(q.dtype).min), dim=-1) @ v

    q, k, v = qkv()
    keep = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    keep[1] = False  # the second batch element has no valid key at all
    for fn in (padded, padded_min):
        torch._dynamo.reset()
        import almostlinear

        backend = almostlinear.Backend(method="exact", inner="aot_eager")
        out = torch.compile(fn, backend=backend)(q, k, v, keep)
        torch.testing.assert_close(out, fn(q, k, v, keep), equal_nan=True)
        assert backend.reports[-1].sites[0].mask_kind == "key_padding"
        assert backend.reports[-1].sites[0].rewritten
