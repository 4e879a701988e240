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
