"""The CPU path's blocking (kernels/cpu/context.py): any number of chunks per block gives the same result, with
several blocks so that the running states cross block boundaries, in every regime and mask kind."""
import pytest
import torch

from almostlinear.kernels import cpu, naive_poly_attention
from almostlinear.kernels.cpu import context
from almostlinear.kernels.features import Quad2Features

from tests.kernels.kernel_helpers import make_inputs, rms_ratio
from tests.kernels.test_cpu_path import MASKS  # kind -> (causal, key_padding, alibi, window)

KINDS = ["none", "causal", "causal+key_padding", "causal+alibi", "alibi", "causal+window"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunks_per_block", [1, 2, 3])
@pytest.mark.parametrize("L", [40, 43])
def test_chunks_per_block(monkeypatch, kind, chunks_per_block, L):
    causal, kw, alibi, window = MASKS[kind]
    B, Hq, Hk, chunk = 2, 4, 2, 4
    monkeypatch.setattr(context, "BLOCK_ROWS", B * Hq * chunk * chunks_per_block)
    q, k, v, key_weight, slopes = make_inputs(B, Hq, Hk, L, D=8, Dv=6, dtype=torch.float64, kw=kw, alibi=alibi)
    args = dict(scale=0.3, coeffs=(1.0, 1.0, 0.5), causal=causal, window=window, chunk=chunk)
    ref = naive_poly_attention(q, k, v, scale=0.3, causal=causal, key_weight=key_weight, alibi_slopes=slopes,
                               window=window)
    grad = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, (q, k, v), grad)
    with torch.no_grad():
        out, _, state = cpu.forward(q, k, v, key_weight, slopes, **args)
        got = cpu.backward(grad, q, k, v, out, key_weight, slopes, state=state, **args)
    assert rms_ratio(out, ref) < 1e-10
    for a, b in zip(got, expected):
        assert rms_ratio(a, b) < 1e-10


def test_blocks_cover_the_sequence_in_whole_chunks():
    q, k, v, _, _ = make_inputs(1, 2, 2, 8, D=4, Dv=4, requires_grad=False)
    cx = context.CallContext(q, k, v, None, None, 0.5, (1.0, 1.0, 0.5), True, 0, 8)
    for n in (1, 8, 9, 100, 1000):
        for chunked in (True, False):
            blocks = cx.blocks(n, chunked)
            assert blocks[0].i0 == 0 and blocks[-1].i1 == n
            assert all(a.i1 == b.i0 for a, b in zip(blocks, blocks[1:]))
            assert all(b.i1 - b.i0 == b.g * b.C for b in blocks)
            if chunked:
                assert all(b.C == 8 for b in blocks[:-1]) and all(b.g == 1 for b in blocks if b.C != 8)


def test_bound_feature_maps_are_made_once_per_buffer_and_never_reused_for_another_tensor(monkeypatch):
    """CallContext.phi binds its views to the input's address: a reused buffer gets the same bound function and
    fresh values, a different tensor of the same shape a new one (never stale views)."""
    q, k, v, _, _ = make_inputs(1, 2, 2, 64, D=16, Dv=4, requires_grad=False)
    cx = context.CallContext(q, k, v, None, None, 0.25, (1.0, 1.0, 0.5), False, 0, 32)
    ref = Quad2Features(cx.fm.d, cx.fm.coeffs, cx.fm.scale).phi_t  # not counted
    binds = []
    bind = cx.fm.bind_phi_t
    monkeypatch.setattr(cx.fm, "bind_phi_t", lambda *a: binds.append(a) or bind(*a))
    xT = cx.feature_major(q[0, :, :32], "qT")
    first = cx.phi(xT, "q").clone()
    assert torch.equal(first, ref(xT, "q")) and len(binds) == 1
    xT2 = cx.feature_major(q[0, :, 32:], "qT")  # the same buffer, new rows
    assert xT2.data_ptr() == xT.data_ptr()
    second = cx.phi(xT2, "q")
    assert torch.equal(second, ref(xT2, "q")) and not torch.equal(second, first) and len(binds) == 1
    other = torch.randn_like(xT2)  # not a buffer: bound anew
    assert torch.equal(cx.phi(other, "q"), ref(other, "q")) and len(binds) == 2
