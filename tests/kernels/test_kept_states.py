"""The causal forward's kept per-chunk states (cpu.forward(keep_states=True), the op's ``keep_states``): the
backward that reuses them gives exactly what the recomputing one gives, in every causal mask kind and blocking;
the op keeps them only when a backward will come and within cpu.KEEP_STATES_MIB; fake and real shapes agree."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import almostlinear
from almostlinear.kernels import cpu, naive_poly_attention, poly_attention
from almostlinear.kernels.cpu import context

from tests.kernels.kernel_helpers import make_inputs, rms_ratio

OP = torch.ops.almostlinear.poly_attention.default
CAUSAL_KINDS = {"causal": (False, False), "causal+key_padding": (True, False), "causal+alibi": (False, True),
                "causal+alibi+key_padding": (True, True)}


@pytest.mark.parametrize("kind", list(CAUSAL_KINDS))
@pytest.mark.parametrize("chunks_per_block", [1, 3])
@pytest.mark.parametrize("degree", [2, 4])
def test_kept_states_give_the_recomputed_gradients(monkeypatch, kind, chunks_per_block, degree):
    kw, alibi = CAUSAL_KINDS[kind]
    B, Hq, Hk, chunk, L = 2, 4, 2, 4, 43  # 11 chunks, the last one partial; GQA
    monkeypatch.setattr(context, "BLOCK_ROWS", B * Hq * chunk * chunks_per_block)
    D = 8 if degree == 2 else 3
    coeffs = (1.0, 1.0, 0.5) if degree == 2 else (1.0, 1.0, 0.5, 1 / 6, 1 / 24)
    q, k, v, key_weight, slopes = make_inputs(B, Hq, Hk, L, D=D, Dv=6, dtype=torch.float64, kw=kw, alibi=alibi,
                                              requires_grad=False)
    args = dict(scale=0.3, coeffs=coeffs, causal=True, chunk=chunk)
    grad = torch.randn(B, Hq, L, 6, dtype=torch.float64)
    out, _, none = cpu.forward(q, k, v, key_weight, slopes, **args)
    kept_out, _, kept = cpu.forward(q, k, v, key_weight, slopes, keep_states=True, **args)
    assert none is None and kept is not None
    expected_shape = cpu.state_shape(B, Hq, Hk, D, 6, degree, alibi, True, 0, L=L, keep_states=True, itemsize=8,
                                     chunk=chunk)
    assert tuple(kept.shape) == expected_shape
    assert torch.equal(out, kept_out)
    recomputed = cpu.backward(grad, q, k, v, out, key_weight, slopes, **args)
    reused = cpu.backward(grad, q, k, v, out, key_weight, slopes, state=kept, **args)
    for a, b in zip(reused, recomputed):
        assert torch.equal(a, b)
    # and both are the reference's gradients
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = naive_poly_attention(qr, kr, vr, scale=0.3, coefficients=coeffs, degree=degree, causal=True,
                               key_weight=key_weight, alibi_slopes=slopes)
    assert rms_ratio(out, ref) < 1e-10
    for a, b in zip(reused, torch.autograd.grad(ref, (qr, kr, vr), grad)):
        assert rms_ratio(a, b) < 1e-10


def test_a_state_from_other_inputs_is_refused():
    q, k, v, _, _ = make_inputs(1, 2, 2, 40, D=8, Dv=6, requires_grad=False)
    args = dict(scale=0.3, coeffs=(1.0, 1.0, 0.5), causal=True, chunk=4)
    out, _, kept = cpu.forward(q, k, v, keep_states=True, **args)
    with pytest.raises(ValueError, match=r"chunk 8 \(expected"):
        cpu.backward(out, q, k, v, out, state=kept, **{**args, "chunk": 8})


def _state(q, k, v, window=0, causal=True, keep=True):
    return OP(q, k, v, None, None, 0.3, [1.0, 1.0, 0.5], causal, window, keep)[1]


def test_the_op_keeps_states_only_when_asked_and_within_the_budget(monkeypatch):
    q, k, v, _, _ = make_inputs(1, 2, 2, 300, D=8, Dv=6, requires_grad=False)
    assert _state(q, k, v).numel() > 0
    assert _state(q, k, v, keep=False).numel() == 0
    assert _state(q, k, v, window=16).numel() == 0  # banded: nothing to keep
    assert _state(q, k, v, causal=False).shape == _state(q, k, v, causal=False, keep=False).shape  # global state
    size_mib = _state(q, k, v).numel() * 4 / 2 ** 20
    monkeypatch.setattr(cpu, "KEEP_STATES_MIB", size_mib * 0.99)
    assert _state(q, k, v).numel() == 0
    monkeypatch.setattr(cpu, "KEEP_STATES_MIB", size_mib)
    assert _state(q, k, v).numel() > 0


def _spy_forward(monkeypatch):
    kept = []
    real = cpu.forward

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        kept.append(result[2] is not None and result[2].numel() > 0)
        return result
    monkeypatch.setattr(cpu, "forward", spy)
    return kept


def test_poly_attention_keeps_states_for_a_backward_only(monkeypatch):
    kept = _spy_forward(monkeypatch)
    q, k, v, _, _ = make_inputs(1, 2, 2, 300, D=8, Dv=6)
    out = poly_attention(q, k, v, scale=0.3, causal=True)
    with torch.no_grad():
        poly_attention(q, k, v, scale=0.3, causal=True)
    poly_attention(q.detach(), k.detach(), v.detach(), scale=0.3, causal=True)
    assert kept == [True, False, False]
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    monkeypatch.setattr(cpu, "KEEP_STATES_MIB", 0)
    out2 = poly_attention(q, k, v, scale=0.3, causal=True)
    for a, b in zip(grads, torch.autograd.grad(out2, (q, k, v), torch.ones_like(out2))):
        assert torch.equal(a, b)


def test_the_backend_keeps_states_in_training_graphs_only(monkeypatch):
    kept = _spy_forward(monkeypatch)
    q, k, v, _, _ = make_inputs(1, 2, 2, 300, D=8, Dv=8)

    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    compiled = torch.compile(attend, backend=almostlinear.Backend(method="polynomial", min_seq_len=0,
                                                                  inner="aot_eager"))
    out = compiled(q, k, v)
    out.sum().backward()
    training = list(kept)
    kept.clear()
    with torch.no_grad():
        compiled(q, k, v)
    assert training and training[-1] and not any(kept)


@pytest.mark.parametrize("alibi,degree", [(False, 2), (True, 2), (False, 4)])
def test_fake_kept_state_shape_matches_the_real_one(alibi, degree):
    coeffs = [1.0, 1.0, 0.5] if degree == 2 else [1.0, 1.0, 0.5, 1 / 6, 1 / 24]
    D = 8 if degree == 2 else 3
    q, k, v, _, slopes = make_inputs(1, 4, 2, 300, D=D, Dv=6, alibi=alibi, requires_grad=False)
    real = OP(q, k, v, None, slopes, 0.3, coeffs, True, 0, True)[1]
    mode = FakeTensorMode()
    with mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fslopes = None if slopes is None else mode.from_tensor(slopes)
        fake = OP(fq, fk, fv, None, fslopes, 0.3, coeffs, True, 0, True)[1]
    assert real.numel() > 0 and fake.shape == real.shape and fake.dtype == real.dtype
