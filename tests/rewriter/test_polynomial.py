"""method="polynomial": supported sites become torch.ops.almostlinear.poly_attention, the rest stay exact."""
import pytest
import torch

import almostlinear
from almostlinear.kernels import naive_poly_attention
from almostlinear.zoo.gpt import GPT, GPTConfig


def _attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


def _causal(q, k, v):
    T = q.size(-2)
    s = (q @ k.transpose(-2, -1)) * 0.25
    s = s.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
    return s.softmax(-1) @ v


def _padded(q, k, v, keep):  # keep: [B, S] bool, per key
    s = (q @ k.transpose(-2, -1)) * 0.25
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ v


def _qkv(T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, T, 16, generator=g).requires_grad_() for _ in range(3)]


def _compile(fn, **options):
    backend = almostlinear.Backend(method="polynomial", min_seq_len=0, inner="aot_eager", **options)
    return torch.compile(fn, backend=backend), backend


@pytest.mark.parametrize("fn,causal", [(_attention, False), (_causal, True)])
def test_rewritten_site_equals_naive_reference_forward_and_backward(fn, causal):
    q, k, v = _qkv()
    compiled, backend = _compile(fn)
    out = compiled(q, k, v)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = naive_poly_attention(q2, k2, v2, scale=0.25, causal=causal)
    (ref * torch.linspace(-1, 1, ref.numel()).reshape(ref.shape)).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, t in zip(grads, (q2, k2, v2)):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)
    site = backend.reports[-1].sites[0]
    assert site.method == "polynomial" and site.degree == 2 and site.rank == 153  # C(16+2, 2)
    assert "almostlinear.poly_attention" in backend.reports[-1].graph_after


def test_key_padding_becomes_a_per_key_weight():
    q, k, v = _qkv()
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[1, 25:] = False
    compiled, backend = _compile(_padded)
    out = compiled(q, k, v, keep)
    ref = naive_poly_attention(q, k, v, scale=0.25, key_weight=keep.float())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert backend.reports[-1].sites[0].mask_kind == "key_padding"


def test_gqa_uses_unrepeated_keys_and_values():
    def gqa(q, k, v):  # HF repeat_kv spelling
        B, Hk, S, D = k.shape
        k = k[:, :, None, :, :].expand(B, Hk, 2, S, D).reshape(B, Hk * 2, S, D)
        v = v[:, :, None, :, :].expand(B, Hk, 2, S, D).reshape(B, Hk * 2, S, D)
        return _attention(q, k, v)

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    compiled, backend = _compile(gqa)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, naive_poly_attention(q, k, v, scale=0.25), atol=1e-5, rtol=1e-5)
    report = backend.reports[-1]
    assert report.sites[0].gqa_groups == 2
    assert "expand" not in report.graph_after, "repeated K/V must not be materialised"


def test_unsupported_sites_stay_exact_with_the_reason():
    q, k, v = _qkv()
    bias = torch.randn(1, 1, 40, 40)

    def dense(q, k, v, bias):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + bias, -1) @ v

    def with_dropout(q, k, v):
        return torch.nn.functional.dropout(torch.softmax(q @ k.transpose(-2, -1), -1), 0.1, True) @ v

    compiled, backend = _compile(dense)
    torch.testing.assert_close(compiled(q, k, v, bias), dense(q, k, v, bias))
    site = backend.reports[-1].sites[0]
    assert site.method == "exact" and "has no linear-time structure" in site.reason
    torch._dynamo.reset()
    compiled, backend = _compile(with_dropout)
    compiled(q, k, v)
    site = backend.reports[-1].sites[0]
    assert site.method == "exact" and "dropout" in site.reason


def test_short_sequences_stay_exact_below_the_crossover():
    q, k, v = _qkv(T=32)
    backend = almostlinear.Backend(method="polynomial", inner="aot_eager")  # default min_seq_len
    torch.compile(_attention, backend=backend)(q, k, v)
    site = backend.reports[-1].sites[0]
    assert site.method == "exact" and "min_seq_len" in site.reason


@pytest.mark.parametrize("inner", ["aot_eager", pytest.param("inductor", marks=pytest.mark.inductor)])
def test_gpt_trains_through_the_polynomial_op(inner):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    tokens = torch.randint(0, 96, (2, 64))
    backend = almostlinear.Backend(method="polynomial", min_seq_len=0, inner=inner)
    loss = torch.compile(model, backend=backend)(tokens, tokens)
    loss.backward()
    assert all(s.method == "polynomial" and s.mask_kind == "causal" for s in backend.reports[-1].sites)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    eager = model(tokens, tokens)
    assert abs(loss.item() - eager.item()) < 1e-3 * abs(eager.item())  # small logits at init


class _DropoutAttention(torch.nn.Module):
    """BERT-style: dropout on the attention probabilities in training."""

    def forward(self, q, k, v):
        p = (q @ k.transpose(-2, -1) / 8**0.5).softmax(-1)
        return torch.nn.functional.dropout(p, 0.1, self.training) @ v


def test_attention_dropout_remove_approximates_dropout_sites_and_says_the_regularisation_changed():
    """Issue 25: a site with attention dropout stays exact (the op has no dropout); under method="polynomial",
    attention_dropout="remove" approximates it, without the dropout, and the report says so."""
    torch.manual_seed(0)
    q, k, v = (0.1 * torch.randn(2, 2, 64, 8) for _ in range(3))
    model = _DropoutAttention().train()
    results = {}
    for choice in ("keep", "remove"):
        torch._dynamo.reset()
        backend = almostlinear.Backend(method="polynomial", min_seq_len=0, inner="eager", attention_dropout=choice)
        out = torch.compile(model, backend=backend)(q, k, v)
        results[choice] = (backend.reports[-1].sites[0], out)
    kept, removed = results["keep"][0], results["remove"][0]
    assert kept.method == "exact" and "dropout" in kept.reason, kept.reason
    assert removed.method == "polynomial" and "dropout (p = 0.1) REMOVED" in removed.reason, removed.reason
    no_dropout = _DropoutAttention().eval()(q, k, v)
    assert float((results["remove"][1] - no_dropout).norm() / no_dropout.norm()) < 1e-3


def test_attention_dropout_remove_is_offered_with_method_polynomial_only():
    with pytest.raises(ValueError, match="attention_dropout='remove' changes how the model trains.*got method='auto'"):
        almostlinear.Backend(attention_dropout="remove")
    with pytest.raises(ValueError, match=r"attention_dropout must be one of \['keep', 'remove'\], got 'drop'"):
        almostlinear.Backend(method="polynomial", attention_dropout="drop")
