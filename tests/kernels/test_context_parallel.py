"""Context parallelism's ops (kernels/context_parallel.py) in one process: a sequence cut into shards, each
shard's key state, the external states summed as the rewrite's glue sums the gathered ones
(passes/context_parallel_glue.external_state), and every shard's output and the gradients of q, k, v equal the
naive reference over the whole sequence (fp64).  Plus opcheck, autocast and argument errors."""
import pytest
import torch

from almostlinear.kernels import naive_poly_attention
from almostlinear.kernels.context_parallel import key_state, poly_state_attention, state_bytes, state_shapes
from almostlinear.passes.context_parallel_glue import external_state

from tests.kernels.kernel_helpers import make_inputs

SCALE = 0.4


def sharded_attention(q, k, v, lengths, *, causal, key_weight=None, alibi_slopes=None, scale=SCALE):
    """Every shard's output, concatenated: what the ranks of a group compute together."""
    bounds, s = [], 0
    for n in lengths:
        bounds.append((s, s + n))
        s += n
    kw = (lambda a, b: None) if key_weight is None else (lambda a, b: key_weight[:, a:b])
    states = [key_state(k[:, :, a:b], v[:, :, a:b], query_heads=q.shape[1], scale=scale, key_weight=kw(a, b),
                        alibi_slopes=alibi_slopes) for a, b in bounds]
    values, moments = torch.stack([s[0] for s in states]), torch.stack([s[1] for s in states])
    outs = []
    for rank, (a, b) in enumerate(bounds):
        ev, em = external_state(values, moments, torch.tensor(lengths), rank, causal, alibi_slopes)
        outs.append(poly_state_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], ev, em, scale=scale,
                                         causal=causal, key_weight=kw(a, b), alibi_slopes=alibi_slopes))
    return torch.cat(outs, 2)


CASES = [dict(), dict(kw=True), dict(alibi=True), dict(kw=True, alibi=True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c) or "plain")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "global"])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("lengths", [[45, 45], [30, 0, 60], [10, 50, 30], [90]], ids=str)
def test_shards_equal_the_whole_sequence(case, causal, gqa, lengths):
    q, k, v, key_weight, slopes = make_inputs(2, 4, 2 if gqa else 4, 90, D=8, Dv=6, dtype=torch.float64,
                                              kw=case.get("kw", False), alibi=case.get("alibi", False))
    if slopes is not None:
        slopes = slopes.abs()  # ALiBi slopes are >= 0 (the states' exponents stay <= 0)
    g = torch.randn(2, 4, 90, 6, dtype=torch.float64)
    args = dict(causal=causal, key_weight=key_weight, alibi_slopes=slopes)
    got = sharded_attention(q, k, v, lengths, **args)
    want = naive_poly_attention(q, k, v, scale=SCALE, **args)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (got, *torch.autograd.grad(got, (q, k, v), g)),
                          (want, *torch.autograd.grad(want, (q, k, v), g))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_state_size_does_not_depend_on_the_shard_length():
    for n in (1, 64, 1000):
        k, v = torch.randn(1, 2, n, 64), torch.randn(1, 2, n, 64)
        values, moments = key_state(k, v, query_heads=2, scale=0.125)
        assert (tuple(values.shape), tuple(moments.shape)) == state_shapes(1, 2, 2, 64, 64, False)
    # r = 2,145 at d = 64: 2,145 * 64 + 4,161 floats per head, ~0.56 MB (the figure)
    assert state_bytes(1, 1, 1, 64, 64, False) == (2145 * 64 + 1 + 64 + 64 * 64) * 4


def test_opcheck():
    q, k, v, key_weight, slopes = make_inputs(1, 4, 2, 20, D=4, Dv=3, kw=True, alibi=True)
    slopes = slopes.abs()
    ev, em = (torch.randn(s) for s in state_shapes(1, 4, 2, 4, 3, True))
    em = em.abs()
    for causal in (True, False):
        torch.library.opcheck(torch.ops.almostlinear.poly_state_attention.default,
                              (q, k, v, key_weight, slopes, 0.5, [1.0, 1.0, 0.5], causal, ev, em, True))
    torch.library.opcheck(torch.ops.almostlinear.poly_key_state.default, (k, v, key_weight, slopes, 4, 0.5,
                                                                          [1.0, 1.0, 0.5]))


def test_key_state_gradients_match_autograd_of_its_definition():
    """dk, dv of an arbitrary (non-symmetric) cotangent of the moments: the true derivative, by gradcheck."""
    k = torch.randn(1, 2, 7, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 7, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda k, v: key_state(k, v, query_heads=2, scale=0.7), (k, v))


def test_under_autocast_the_output_has_the_autocast_dtype():
    q, k, v, _, _ = make_inputs(1, 2, 2, 16, D=8, Dv=8)
    ev, em = key_state(k, v, query_heads=2, scale=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = poly_state_attention(q, k, v, ev, em, scale=0.3, causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), poly_state_attention(q, k, v, ev, em, scale=0.3, causal=True),
                               rtol=0.05, atol=0.05)


def test_a_state_of_the_wrong_shape_is_named():
    q, k, v, _, _ = make_inputs(1, 2, 2, 16, D=8, Dv=8)
    ev, em = key_state(k, v, query_heads=2, scale=0.3)
    with pytest.raises(ValueError, match=r"ext_moments must have shape \[1, 2, 1, 73\]"):
        poly_state_attention(q, k, v, ev, em[..., :-1], scale=0.3)


@pytest.mark.parametrize("keep_mib", [256.0, 0.0], ids=["kept-states", "recomputed-states"])
def test_long_shards_over_several_chunks_and_blocks(keep_mib, monkeypatch):
    """Shards of several chunks (128 tokens) and blocks of several chunks: the initial state enters every chunk's
    prefix, forward and backward, whether the backward reads the forward's kept states or recomputes them."""
    from almostlinear.kernels import cpu

    monkeypatch.setattr(cpu, "KEEP_STATES_MIB", keep_mib)
    q, k, v, key_weight, slopes = make_inputs(2, 4, 2, 600, D=4, Dv=3, dtype=torch.float64, kw=True, alibi=True)
    slopes = slopes.abs() * 0.05
    g = torch.randn(2, 4, 600, 3, dtype=torch.float64)
    args = dict(causal=True, key_weight=key_weight, alibi_slopes=slopes)
    got = sharded_attention(q, k, v, [260, 340], **args)
    want = naive_poly_attention(q, k, v, scale=SCALE, **args)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (got, *torch.autograd.grad(got, (q, k, v), g)),
                          (want, *torch.autograd.grad(want, (q, k, v), g))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
