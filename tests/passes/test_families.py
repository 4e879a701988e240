"""Spelling families the matcher once missed (tests/passes/spellings.py FAMILIES), and real models using them.

1. dead uses: introspection copies of the scores/weights that nothing reads do not block a match; live
   uses (returned, stored on a module, mutated in place, a random op) stay near misses that name the use;
2. layouts: scores/weights reshaped between [B*H, L, S] and [B, H, L, S] (BLOOM's baddbmm + views) are seen
   through; the site is rewritten in the [B, H] layout, masks and ALiBi classified per head, GQA recovered;
3. score transforms (soft-cap, clamp): sites with their mask classified, kept as written, never rewritten.

Every site equals eager in exact mode (outputs and gradients, fp32 round-off).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx

import almostlinear
from almostlinear.kinds import MaskKind
from almostlinear.passes.graph_utils import eliminate_dead_pure_code, is_pure
from almostlinear.passes.match import find_sites
from almostlinear.passes.normalize import normalize
from tests.oracle import assert_exact_oracle

from .spellings import DEAD_USES, FAMILIES, H, LAYOUTS, LIVE_USES, TRANSFORMS, qkv


def _ids(entries):
    return [e[0] for e in entries]


def _captured(fn, inputs, dynamic=False) -> list[tuple[fx.GraphModule, list]]:
    """The Dynamo graphs of `fn` (as Dynamo hands them to a backend) with their example inputs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, dynamic=dynamic)(*inputs)
    return graphs


def _matched(fn, inputs):
    """find_sites on a normalized copy of each captured graph: the AttentionSite objects themselves."""
    sites, misses = [], []
    for gm, example_inputs in _captured(fn, inputs):
        work = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        normalize(work)
        found, missed = find_sites(work, example_inputs)
        sites += found
        misses += missed
    return sites, misses


def _check(report, expected):
    site = report.sites[0]
    assert site.mask_kind == expected["mask"], str(report)
    assert site.causal == expected.get("causal", False), str(report)
    assert site.method == expected.get("method", "exact"), str(report)
    assert site.rewritten == (expected.get("method", "exact") == "exact"), str(report)
    if "gqa" in expected:
        assert site.gqa_groups == expected["gqa"], str(report)
    return site


# ---------------------------------------------------------------------------------------------------
# 1. Dead uses
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
@pytest.mark.parametrize("name,fn,extra,expected", DEAD_USES, ids=_ids(DEAD_USES))
def test_dead_uses_do_not_block_the_match(name, fn, extra, expected, inner):
    report = assert_exact_oracle(fn, (*qkv(), *extra()), inner=inner, expect_sites=1)
    site = _check(report, expected)
    assert site.scale == pytest.approx(expected["scale"])
    assert not report.near_misses, str(report)


@pytest.mark.parametrize("name,fn,extra,expected", DEAD_USES, ids=_ids(DEAD_USES))
def test_dead_uses_survive_dynamo(name, fn, extra, expected):
    """The family is meaningful: Dynamo leaves the dead copies in the graph the backend receives."""
    (gm, _), = _captured(fn, (*qkv(), *extra()))
    work = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    assert eliminate_dead_pure_code(work) > 0, gm.code


@pytest.mark.parametrize("name,fn,extra,word", LIVE_USES, ids=_ids(LIVE_USES))
def test_live_uses_stay_near_misses_with_the_use_named(name, fn, extra, word):
    report = assert_exact_oracle(fn, (*qkv(), *extra()), inner="eager")
    assert not any(s.rewritten for s in report.sites), str(report)
    reasons = [m.reason for m in report.near_misses]
    assert any("used outside the site" in r and word in r for r in reasons), reasons


def test_dead_code_elimination_keeps_side_effects():
    """In-place ops, random ops, grad-mode switches and graph outputs are never erased; pure dead ops are."""
    def fn(x, y):
        c = x.clone()
        c.add_(1.0)  # in-place on a private copy: kept (with the clone it reads)
        _ = torch.nn.functional.dropout(x, 0.5, True)  # draws from the RNG: kept
        with torch.no_grad():
            _ = (x * 2).sum()  # dead and pure: erased
        y.mul_(2.0)  # mutates an input: kept
        return x + 1

    (gm, _), = _captured(fn, (torch.randn(4), torch.randn(4)))
    work = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    before = [n.target for n in work.graph.nodes]
    removed = eliminate_dead_pure_code(work)
    after = [n.target for n in work.graph.nodes]
    assert removed == 2, (before, after)  # x * 2 and its sum
    assert "add_" in after and "mul_" in after and "clone" in after
    assert any(getattr(t, "__name__", "") == "dropout" for t in after)
    assert any(getattr(t, "__name__", "") == "_set_grad_enabled" for t in after)
    assert not any(is_pure(n) and not n.users for n in work.graph.nodes)


# ---------------------------------------------------------------------------------------------------
# 2. Layout changes over merged batch x heads
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
@pytest.mark.parametrize("name,fn,extra,expected", LAYOUTS, ids=_ids(LAYOUTS))
def test_layout_changes_are_seen_through(name, fn, extra, expected, inner):
    report = assert_exact_oracle(fn, (*qkv(), *extra()), inner=inner, expect_sites=1)
    site = _check(report, expected)
    assert site.scale == pytest.approx(expected["scale"])
    assert len(site.q_shape) == 4 and site.q_shape[1] == H, str(report)  # heads recovered: [B, H, L, D]
    assert "softmax" not in report.graph_after and "bmm" not in report.graph_after.replace("baddbmm", "")


@pytest.mark.parametrize("name,fn,extra,expected", LAYOUTS, ids=_ids(LAYOUTS))
def test_layout_changes_dynamic_shapes(name, fn, extra, expected):
    report = assert_exact_oracle(fn, (*qkv(), *extra()), inner="aot_eager", dynamic=True, expect_sites=1)
    _check(report, expected)


@pytest.mark.parametrize("name,fn,extra,expected", [e for e in LAYOUTS if "alibi_heads" in e[3]],
                         ids=[e[0] for e in LAYOUTS if "alibi_heads" in e[3]])
def test_alibi_over_merged_heads_has_one_slope_per_head(name, fn, extra, expected):
    (site,), _ = _matched(fn, (*qkv(), *extra()))
    assert site.mask.kind == "alibi"
    assert site.mask.alibi_slopes == pytest.approx([0.5, 0.25, 0.125][:expected["alibi_heads"]])


def test_merged_alibi_site_runs_through_the_polynomial_op():
    """The [B, H] layout is what the op takes: the BLOOM-style site is approximated with per-head slopes."""
    fn = LAYOUTS[0][1]
    q, k, v = (x * 0.1 for x in qkv())  # small logits: degree 2 is close to exp
    torch._dynamo.reset()
    backend = almostlinear.Backend(method="polynomial", inner="eager", min_seq_len=1, budget=1.0)
    out = torch.compile(fn, backend=backend)(q, k, v)
    site = backend.reports[-1].sites[0]
    assert site.method == "polynomial" and site.mask_kind == "alibi", str(backend.reports[-1])
    torch.testing.assert_close(out, fn(q, k, v), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------------
# 3. Score transforms: sites kept as written
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,fn,extra,expected", TRANSFORMS, ids=_ids(TRANSFORMS))
def test_score_transforms_are_sites_kept_as_written(name, fn, extra, expected):
    report = assert_exact_oracle(fn, (*qkv(), *extra()), inner="aot_eager", expect_sites=1)
    site = _check(report, expected)
    assert site.scale == pytest.approx(expected["scale"])
    assert site.reason.startswith(f"kept as written: {expected['transform']}"), site.reason
    assert not report.near_misses, str(report)
    assert ("tanh" in report.graph_after) or ("clamp" in report.graph_after)
    assert "unflatten" not in report.graph_after  # no layout conversion left behind by a site kept as written


@pytest.mark.parametrize("options", [{"method": "polynomial"}, {"method": "auto", "sites": {"*": "exact"}},
                                     {"method": "auto", "sites": {"*": "polynomial"}}])
@pytest.mark.parametrize("name,fn,extra,expected", TRANSFORMS[:3], ids=_ids(TRANSFORMS[:3]))
def test_no_option_drops_the_transform(name, fn, extra, expected, options):
    inputs = (*qkv(), *extra())
    torch._dynamo.reset()
    backend = almostlinear.Backend(inner="eager", min_seq_len=1, **options)
    out = torch.compile(fn, backend=backend)(*inputs)
    torch.testing.assert_close(out, fn(*inputs), atol=0, rtol=0)
    (site,) = backend.reports[-1].sites
    assert site.method == "unchanged" and not site.rewritten, str(backend.reports[-1])


def test_exact_rewrite_refuses_a_transformed_site():
    from almostlinear.passes.rewrite import RewriteError, rewrite_exact

    fn = TRANSFORMS[0][1]
    (gm, example_inputs), = _captured(fn, qkv())
    work = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    normalize(work)
    (site,), _ = find_sites(work, example_inputs)
    with pytest.raises(RewriteError, match="soft-capped"):
        rewrite_exact(work, site, None)


# ---------------------------------------------------------------------------------------------------
# Found / total per family
# ---------------------------------------------------------------------------------------------------


def test_every_spelling_of_every_family_is_a_site():
    found = {}
    for family, entries in FAMILIES.items():
        hits = 0
        for name, fn, extra, expected in entries:
            sites, misses = _matched(fn, (*qkv(), *extra()))
            hits += len(sites) == 1 and not misses and sites[0].mask.kind == expected["mask"]
        found[family] = (hits, len(entries))
    print("found/total per family:", found)
    assert all(h == n for h, n in found.values()), found


def test_mask_kinds_are_mask_kind_members():
    """Every kind the matcher writes is a MaskKind member (one definition; it equals its string)."""
    for family, entries in FAMILIES.items():
        name, fn, extra, _ = entries[0]
        sites, _ = _matched(fn, (*qkv(), *extra()))
        assert sites and all(type(site.mask.kind) is MaskKind for site in sites), (family, name)


# ---------------------------------------------------------------------------------------------------
# Real models (HF transformers, small configs, random weights, nothing downloaded)
# ---------------------------------------------------------------------------------------------------


class _Hidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).last_hidden_state


def _ids_input(seq: int = 64):
    return torch.randint(0, 100, (2, seq), generator=torch.Generator().manual_seed(0))


def test_hf_bloom_alibi_is_found_classified_and_exact():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BloomConfig(n_layer=2, hidden_size=64, n_head=4, vocab_size=100, hidden_dropout=0.0,
                         attention_dropout=0.0, attn_implementation="eager", use_cache=False)
    model = tf.BloomModel(cfg).train()
    report = assert_exact_oracle(_Hidden(model), (_ids_input(),), inner="aot_eager", expect_sites=2)
    assert not report.near_misses, str(report)
    for site in report.sites:
        assert site.mask_kind == "alibi" and site.causal and site.rewritten, str(report)
        assert site.q_shape == (2, 4, 64, 16), str(report)
    assert "softmax" not in report.graph_after and "baddbmm" not in report.graph_after
    sites, _ = _matched(_Hidden(model), (_ids_input(),))
    slopes = [2 ** (-2 * (i + 1)) for i in range(4)]  # BLOOM's slopes for 4 heads: 2^(-8/4 * h)
    for site in sites:
        assert site.mask.alibi_slopes == pytest.approx(slopes)


def test_hf_gemma2_softcapped_sites_are_kept_as_written():
    tf = pytest.importorskip("transformers")
    if not hasattr(tf, "Gemma2Config"):
        pytest.skip("this transformers has no Gemma2")
    torch.manual_seed(0)
    cfg = tf.Gemma2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=100, max_position_embeddings=128,
                          sliding_window=16, attn_logit_softcapping=50.0, query_pre_attn_scalar=8,
                          attn_implementation="eager", use_cache=False)
    model = tf.Gemma2Model(cfg).train()
    report = assert_exact_oracle(_Hidden(model), (_ids_input(),), inner="aot_eager", expect_sites=2)
    assert not report.near_misses, str(report)
    kinds = sorted(s.mask_kind for s in report.sites)
    assert kinds == ["causal", "causal+window"], str(report)  # layer types alternate sliding / full
    for site in report.sites:
        assert site.method == "unchanged" and not site.rewritten, str(report)
        assert site.reason.startswith("kept as written: soft-capped scores (tanh(s / 50) * 50)"), site.reason
        assert site.gqa_groups == 2 and site.scale == pytest.approx(8 ** -0.5)
