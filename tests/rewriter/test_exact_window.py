"""The exact_window option: method="polynomial" trains with the windowed op, method="auto" offers it per site as
the step between the polynomial alone and exact attention, and the sites it cannot serve say why."""
import pytest
import torch
import torch.nn.functional as F

import almostlinear
from almostlinear.kernels import naive_window_attention
from almostlinear.zoo.gpt import GPT, GPTConfig

T = 64


def _rope(T, D, base=20.0):
    pos = torch.arange(T, dtype=torch.float32).unsqueeze(-1)
    freq = 1.0 / base ** (torch.arange(D // 2, dtype=torch.float32) / (D // 2))
    return torch.cat([torch.cos(pos * freq), torch.sin(pos * freq)], -1)


class LocalHeads(torch.nn.Module):
    """Causal SDPA over 3 heads of 16: head 0 diffuse (small logits), head 1 local (its logits peak at the nearest
    keys: a fixed rotary-like position code, as trained language models' local heads), head 2 sharp on content
    (large logits anywhere).  Loss: mean squared output."""

    def __init__(self, d=48):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.register_buffer("pos", _rope(T, 16))
        self.gain = torch.tensor([0.2, 1.0, 4.0]).view(1, 3, 1, 1)
        self.local = torch.tensor([0.0, 3.0, 0.0]).view(1, 3, 1, 1)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, 3, 16).permute(2, 0, 3, 1, 4)
        q = q * self.gain + self.local * self.pos[:L]
        k = k * self.gain + self.local * self.pos[:L]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).pow(2).mean()


def _compile(model, **options):
    torch._dynamo.reset()
    backend = almostlinear.Backend(min_seq_len=0, inner="aot_eager", **options)
    return torch.compile(model, backend=backend), backend


def test_polynomial_with_a_window_computes_the_windowed_attention():
    """The compiled GPT's loss and gradients equal eager with every attention replaced by the naive reference of
    the windowed op (Taylor coefficients: not calibrated, so that the reference knows them)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=T))
    x = torch.randint(0, 96, (2, T))
    compiled, backend = _compile(model, method="polynomial", exact_window=8, sites={"*": "polynomial"})
    loss = compiled(x, x)
    report = backend.reports[-1]
    assert all(s.exact_window == 8 and s.method == "polynomial" for s in report.sites), str(report)
    assert "window 8" in str(report)
    coefficients = [tuple(s.coefficients) if s.coefficients else None for s in report.sites]
    assert "poly_window_attention" in report.graph_after

    grads = torch.autograd.grad(loss, list(model.parameters()))
    # the reference: the same model with the attention chain as the naive windowed op
    for block in model.h:
        block.attn.forward = _windowed_forward(block.attn, coefficients[0])
    want = model(x, x)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _windowed_forward(attn, coefficients):
    def forward(x):
        B, L, C = x.shape
        q, k, v = attn.c_attn(x).split(attn.n_embd, dim=2)
        q, k, v = (t.view(B, L, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
        y = naive_window_attention(q, k, v, scale=(C // attn.n_head) ** -0.5, exact_window=8, causal=True,
                                   coefficients=coefficients)
        return attn.c_proj(y.transpose(1, 2).reshape(B, L, C))
    return forward


def test_the_switchable_op_with_a_window_gives_the_plain_ops_result():
    """recheck_every > 0 builds the switchable op: with the window it computes what the plain windowed op does."""
    model = LocalHeads()
    x = torch.randn(4, T, 48)
    results = []
    for extra in ({}, {"recheck_every": 5}):
        compiled, backend = _compile(model, method="polynomial", exact_window=16, **extra)
        loss = compiled(x)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
        assert backend.reports[-1].sites[0].exact_window == 16
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_auto_takes_the_window_where_it_brings_a_local_head_within_budget():
    model = LocalHeads()
    x = torch.randn(4, T, 48)
    compiled, windowed = _compile(model, budget=0.05, exact_window=16)
    compiled(x)
    compiled_plain, plain_backend = _compile(model, budget=0.05)
    compiled_plain(x)
    without, with_window = plain_backend.reports[-1].sites[0], windowed.reports[-1].sites[0]
    assert without.approximated_heads == [0], str(plain_backend.reports[-1])
    assert with_window.approximated_heads == [0, 1] and with_window.exact_window == 16, str(windowed.reports[-1])
    assert "without / with the window" in with_window.reason
    assert windowed.reports[-1].grad_error <= 0.05


def test_auto_leaves_the_window_out_where_it_brings_no_head():
    """Diffuse heads only: the polynomial alone fits, the window would cost time for nothing."""
    model = LocalHeads()
    with torch.no_grad():
        model.gain.fill_(0.2)
        model.local.zero_()
    compiled, backend = _compile(model, budget=0.05, exact_window=16)
    compiled(torch.randn(4, T, 48))
    site = backend.reports[-1].sites[0]
    assert site.method == "polynomial" and site.exact_window == 0, str(backend.reports[-1])
    assert "no exact window: it brings no head within budget" in site.reason


def test_cross_attention_gets_no_window_and_says_why():
    class Cross(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(1, 2, 32, 16), torch.randn(1, 2, 48, 16), torch.randn(1, 2, 48, 16)
    compiled, backend = _compile(Cross(), method="polynomial", exact_window=8)
    compiled(q, k, v)
    site = backend.reports[-1].sites[0]
    assert site.method == "polynomial" and site.exact_window == 0
    assert "no exact window: query length 32 and key length 48 may differ" in site.reason


def test_a_window_covering_the_masks_own_window_is_exact():
    class Sliding(torch.nn.Module):
        def forward(self, q, k, v):
            i = torch.arange(q.shape[2])
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 8)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q = torch.randn(1, 2, 64, 16)
    compiled, backend = _compile(Sliding(), method="polynomial", exact_window=8)
    compiled(q, q, q)
    site = backend.reports[-1].sites[0]
    assert site.method == "exact" and "covers the mask's own window (8)" in site.reason, str(backend.reports[-1])


@pytest.mark.parametrize("bad", [-1, 2.0, True, "8"])
def test_a_bad_exact_window_names_the_value(bad):
    with pytest.raises(ValueError, match=r"exact_window must be an int >= 0 .* got " + repr(bad).replace("(", r"\(")):
        almostlinear.Backend(exact_window=bad)


def test_inductor_compiles_the_windowed_op_with_no_graph_break():
    model = LocalHeads()
    x = torch.randn(4, T, 48)
    results = []
    for inner in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        backend = almostlinear.Backend(method="polynomial", exact_window=16, min_seq_len=0, inner=inner)
        loss = torch.compile(model, backend=backend, fullgraph=True)(x)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
        assert backend.reports[-1].sites[0].exact_window == 16
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_taylor_coefficients_on_request():
    """coefficients="taylor": never a fit (training from scratch: the planning batch is the initialisation)."""
    model = LocalHeads()
    with torch.no_grad():  # diffuse heads: a fit measures better than Taylor there
        model.gain.fill_(0.2)
        model.local.zero_()
    x = torch.randn(4, T, 48)
    for choice in ("fit", "taylor"):
        compiled, backend = _compile(model, method="polynomial", exact_window=16, coefficients=choice)
        compiled(x)
        site = backend.reports[-1].sites[0]
        assert (site.coefficients is None) == (choice == "taylor"), str(backend.reports[-1])
    with pytest.raises(ValueError, match=r"coefficients must be one of \['fit', 'taylor'\], got 'exact'"):
        almostlinear.Backend(coefficients="exact")
