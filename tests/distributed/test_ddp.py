"""DDP and FSDP2 around a model compiled with backend="almostlinear": two gloo ranks on 127.0.0.1.

One pair of processes runs every scenario (tests/distributed/_workers.py); the tests below read its results
and compare with single-process runs of the same options on the concatenated batch.
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

from . import _workers as W
from ._harness import run_ranks

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo on loopback"),
]


@pytest.fixture(scope="module")
def ranks():
    return run_ranks("tests.distributed._workers:suite", world=2, timeout=300, names=list(W.SCENARIOS))


@pytest.fixture(scope="module")
def refs():
    return {
        "exact": W.reference(W.EXACT, [0, 1]),
        "poly": W.reference(W.POLY, [0, 1]),
        "rank0_auto": W.reference(W.AUTO, [0], scaled=True),
    }


def _ok(ranks, name):
    for rank, results in enumerate(ranks):
        assert results[name]["error"] is None, f"{name} failed on rank {rank}:\n{results[name]['error']}"
    assert ranks[0][name]["agreed"] is True, ranks[0][name]["agreed"]
    assert ranks[0][name]["signature"] == ranks[1][name]["signature"]
    return ranks[0][name], ranks[1][name]


def _assert_grads_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


def _both_sites(result, method, mask="causal"):
    assert sorted(result["sites"]) == [("h.0.attn", method, mask), ("h.1.attn", method, mask)], result["sites"]


def test_ddp_default_settings_small_model_is_one_graph_with_real_inputs(ranks, refs):
    """optimize_ddp=True (DDPOptimizer) but the whole model fits DDP's first bucket: no split."""
    for name, ref, method in (("ddp_default_exact", refs["exact"], "exact"),
                              ("ddp_default_poly", refs["poly"], "polynomial")):
        r0, r1 = _ok(ranks, name)
        assert r0["graphs"] == [{"nodes": r0["graphs"][0]["nodes"], "fake": False, "piece": False}]
        _both_sites(r0, method)
        assert r0["signature"] == ref["signature"]
        _assert_grads_equal(r0["grads"], ref["grads"])
        _assert_grads_equal(r1["grads"], ref["grads"])


def test_ddp_optimize_ddp_false_compiling_the_ddp_module(ranks, refs):
    r0, r1 = _ok(ranks, "ddp_noopt_poly")
    assert len(r0["graphs"]) == 1 and not r0["graphs"][0]["fake"]
    _both_sites(r0, "polynomial")
    assert r0["signature"] == refs["poly"]["signature"]
    _assert_grads_equal(r0["grads"], refs["poly"]["grads"])
    _assert_grads_equal(r1["grads"], refs["poly"]["grads"])


def test_ddp_default_settings_split_into_pieces_still_finds_attention(ranks, refs):
    """DDPOptimizer splits at small buckets and hands the plain backend pieces with fake inputs: each
    attention is still found and rewritten exactly (its buffer mask cannot be evaluated: dense)."""
    r0, r1 = _ok(ranks, "ddp_split_plain_exact")
    assert len(r0["graphs"]) > 2 and all(g["piece"] and g["fake"] for g in r0["graphs"]), r0["graphs"]
    assert sorted((p, m) for p, m, _ in r0["sites"]) == [("h.0.attn", "exact"), ("h.1.attn", "exact")], r0
    _assert_grads_equal(r0["grads"], refs["exact"]["grads"])
    _assert_grads_equal(r1["grads"], refs["exact"]["grads"])


def test_compile_for_ddp_rewrites_the_whole_graph_then_splits_at_buckets(ranks, refs):
    r0, r1 = _ok(ranks, "ddp_split_helper_poly")
    assert len(r0["graphs"]) == 1 and not r0["graphs"][0]["fake"] and not r0["graphs"][0]["piece"]
    assert r0["ddp_pieces"][0] > 2, r0["ddp_pieces"]  # bucket_cap_mb=0.01 < 1 works here (torch asserts)
    _both_sites(r0, "polynomial")
    assert r0["signature"] == refs["poly"]["signature"]
    _assert_grads_equal(r0["grads"], refs["poly"]["grads"])
    _assert_grads_equal(r1["grads"], refs["poly"]["grads"])


def test_one_rank_with_huge_logits_makes_every_rank_exact(ranks, refs):
    r0, r1 = _ok(ranks, "skew_auto")
    _both_sites(r0, "exact")
    _both_sites(r1, "exact")
    # rank 0's batch alone (single process) would have been approximated
    assert sorted(m for _, m, _ in refs["rank0_auto"]["sites"]) == ["polynomial", "polynomial"], refs["rank0_auto"]


def test_polynomial_coefficients_agree_when_logit_ranges_differ(ranks):
    """method='polynomial' approximates every site; fitted coefficients depend on the logit range, which
    differs per rank here (rank 1's is ~4x): they must still be identical on both ranks."""
    r0, r1 = _ok(ranks, "skew_poly_fitted")
    _both_sites(r0, "polynomial")
    assert all(coefficients is not None for *_, coefficients in r0["signature"]), r0["signature"]


def test_rechecks_switch_every_rank_when_one_rank_goes_over_budget(ranks):
    r0, r1 = _ok(ranks, "recheck")
    for result in (r0, r1):
        extra = result["extra"]
        assert extra["graphs_compiled"] == 1, extra  # no recompile: the switch is a buffer
        assert extra["before"] == ["polynomial", "polynomial"], extra
        assert extra["after"] == ["exact", "exact"], extra
        assert extra["loss_vs_eager"] < 1e-5, extra  # the split pieces really run exact attention now


def test_compile_for_ddp_with_rechecks_on_hf_gpt2_splits_and_trains(ranks):
    r0, r1 = _ok(ranks, "hf_recheck_split")
    assert r0["ddp_pieces"][0] > 1, r0["ddp_pieces"]
    assert [method for _, method, _ in r0["sites"]] == ["polynomial", "polynomial"], r0["sites"]
    assert r0["loss"] == r1["loss"]  # the same batch on both ranks


def test_fsdp2_fully_shard_then_compile(ranks, refs):
    r0, r1 = _ok(ranks, "fsdp2_exact")
    # Dynamo compiles the (shared) Block graph; FSDP2's hooks and the root forward run outside it
    assert r0["sites"] and all(m == "exact" and k == "causal" for _, m, k in r0["sites"]), r0["sites"]
    _assert_grads_equal(r0["grads"], refs["exact"]["grads"])
    _assert_grads_equal(r1["grads"], refs["exact"]["grads"])
    p0, _ = _ok(ranks, "fsdp2_poly")
    assert p0["sites"] and all(m == "polynomial" for _, m, _ in p0["sites"]), p0["sites"]
