"""Context parallelism on gloo (CPU), 1, 2 and 3 ranks: a sequence split over the ranks gives every shard the output
of a single-process run over the whole sequence, and the parameter gradients summed over the ranks equal its
gradients, to fp32 round-off (polynomial sites: Taylor coefficients on both sides; exact sites: SDPA).  Models:
the example GPT (causal), a BLOOM/MPT-style ALiBi + GQA layer, nn.TransformerEncoderLayer (non-causal, key
padding), HF Llama from a config (sdpa, GQA, RoPE from position ids, right padding); `auto` (the same decisions
on every rank; a site split by heads against the single-process per-head op); Inductor with fullgraph=True;
unequal shards; a group of one; an empty shard (the same clear error on every rank)."""
import pytest
import torch

from tests.distributed import _cp_workers as W
from tests.distributed._harness import run_ranks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TWO = {
    "gpt": ("gpt", [24, 24], False),
    "gpt_exact": ("gpt_exact", [20, 28], False),
    "alibi": ("alibi", [20, 28], False),
    "encoder": ("encoder", [24, 24], False),
    "llama": ("llama", [24, 24], False),
    "gpt_inductor": ("gpt_inductor", [24, 24], True),
    "gpt_auto": ("gpt_auto", [24, 24], False),
    "gpt_heads": ("gpt_heads", [20, 28], False),
}
THREE = {
    "gpt": ("gpt", [10, 20, 18], False),
    "alibi": ("alibi", [10, 20, 18], False),
    "gpt_exact": ("gpt_exact", [16, 16, 16], False),
    "gpt_empty_shard": ("gpt", [20, 0, 28], False),
}


@pytest.fixture(scope="module")
def two():
    return run_ranks("tests.distributed._cp_workers:suite", world=2, timeout=600, cases=TWO)


@pytest.fixture(scope="module")
def three():
    return run_ranks("tests.distributed._cp_workers:suite", world=3, timeout=600, cases=THREE)


_REFERENCES = {}


def reference(name):
    if name not in _REFERENCES:
        _REFERENCES[name] = W.reference(name)
    return _REFERENCES[name]


def assert_equals_one_process(ranks, key, name):
    for r, result in enumerate(ranks):
        assert not isinstance(result[key], str), f"rank {r}: {result[key]}"
    want_out, want_grads = reference(name)
    out = torch.cat([r[key]["out"] for r in ranks], 1)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=2e-5)
    for n, g in want_grads.items():
        summed = sum(r[key]["grads"][n] for r in ranks)
        torch.testing.assert_close(summed, g, rtol=1e-3, atol=1e-4 * max(1.0, float(g.abs().max())),
                                   msg=lambda m: f"grad of {n}: {m}")


@pytest.mark.parametrize("key", list(TWO))
def test_two_ranks_equal_one_process(two, key):
    assert_equals_one_process(two, key, TWO[key][0])


@pytest.mark.parametrize("key", [k for k in THREE if k != "gpt_empty_shard"])
def test_three_ranks_with_unequal_shards_equal_one_process(three, key):
    assert_equals_one_process(three, key, THREE[key][0])


def test_an_empty_shard_is_the_same_clear_error_on_every_rank(three):
    for result in three:
        assert isinstance(result["gpt_empty_shard"], str)
        assert "rank(s) [1] hold an empty shard or no attention site (shard lengths [20, 0, 28])" in \
            result["gpt_empty_shard"]


def test_shard_lengths_never_leave_a_rank_empty():
    import almostlinear

    assert almostlinear.shard_lengths(10, 3) == [4, 3, 3]
    with pytest.raises(ValueError, match="2 tokens cannot be split over 3 ranks"):
        almostlinear.shard_lengths(2, 3)


def test_the_graph_exchanges_states_and_the_report_says_so(two):
    result = two[0]["gpt"]
    assert "exchange_states" in result["graph"] and "poly_state_attention" in result["graph"]
    assert "split over 2 rank(s)" in result["report"] and "key states all-gathered" in result["report"]
    exact = two[1]["gpt_exact"]
    assert "exact_sharded_attention" in exact["graph"] and "keys and values all-gathered" in exact["report"]


def test_auto_decides_the_same_on_every_rank_and_splits_a_site_by_heads(two):
    """`auto` on the sharded run: every rank takes the same decisions (assert_same_decisions ran in each scenario);
    at this initialisation every head fits the budget; a per-head decision runs its approximated heads through the
    states and the others exact over the gathered keys (equal to the single-process per-head op: gpt_heads above)."""
    assert all("polynomial" in str(d) for d in two[0]["gpt_auto"]["decisions"])
    heads = two[0]["gpt_heads"]
    assert [d[5] for d in heads["decisions"]] == [(0,), (0,)]
    assert "the other heads exact over the all-gathered keys and values" in heads["report"]


def test_a_group_of_one_is_the_plain_run():
    ranks = run_ranks("tests.distributed._cp_workers:suite", world=1, timeout=300,
                      cases={"gpt": ("gpt", [W.T], False)})
    assert_equals_one_process(ranks, "gpt", "gpt")
