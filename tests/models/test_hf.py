"""Real models we did not write: HF GPT-2, BERT (padding mask), Llama (RoPE, GQA, padding), eager and sdpa."""
import pytest
import torch

from tests.oracle import assert_exact_oracle

from almostlinear.zoo import build

pytest.importorskip("transformers")

EXPECTED = {  # model -> (mask kind of every site, GQA groups)
    "gpt2": ("causal", 1),
    "bert": ("key_padding", 1),
    "llama": ("causal+key_padding", 2),
}


class _Wrapped(torch.nn.Module):
    """Calls the HF model with keyword arguments and returns its main output tensor."""

    def __init__(self, model, kwargs):
        super().__init__()
        self.model, self.kwargs = model, kwargs

    def forward(self, ids):
        out = self.model(ids, **self.kwargs)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_hf_model_exact_equals_eager(name, impl):
    torch.manual_seed(0)
    model, ids, kwargs = build(name, impl)
    model.train()  # dropout probabilities are 0 in these configs: train-mode code paths, deterministic
    report = assert_exact_oracle(_Wrapped(model, kwargs), (ids,), expect_sites=2)
    kind, groups = EXPECTED[name]
    for site in report.sites:
        assert site.mask_kind == kind, str(report)
        assert site.gqa_groups == groups, str(report)
        assert site.method == "exact"
        if impl == "eager":
            assert site.rewritten, str(report)
    if impl == "eager":
        assert "softmax" not in report.graph_after
    if kind == "causal" and impl == "eager":
        assert "is_causal = True" in report.graph_after


def test_hf_llama_without_padding_is_causal_and_dynamic():
    torch.manual_seed(0)
    model, ids, kwargs = build("llama", "eager", padding=False)
    model.eval()
    report = assert_exact_oracle(_Wrapped(model, kwargs), (ids,), dynamic=True, expect_sites=2)
    assert {s.mask_kind for s in report.sites} == {"causal"}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_llama_with_an_exact_window_on_a_left_padded_batch(impl):
    """method="polynomial" with exact_window on HF Llama (RoPE, causal + key padding, left padding with
    rows that see no key): finite logits equal to eager's within the approximation, every site windowed."""
    import almostlinear

    torch.manual_seed(0)
    model, ids, _ = build("llama", impl=impl, padding=True, layers=2, seq_len=64)
    model.eval()
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, :20] = 0
    reference = model(ids, attention_mask=mask).logits
    torch._dynamo.reset()
    backend = almostlinear.Backend(method="polynomial", min_seq_len=0, inner="eager", exact_window=8)
    out = torch.compile(model, backend=backend)(ids, attention_mask=mask).logits
    report = backend.reports[-1]
    assert bool(torch.isfinite(out).all()), str(report)
    assert [s.exact_window for s in report.sites] == [8, 8], str(report)
    assert float(((out - reference).norm() / reference.norm()).detach()) < 1e-3, str(report)
    assert report.grad_error is not None and report.grad_error < 1e-3, str(report)


@pytest.mark.parametrize("padding", ["left", "all"])
@pytest.mark.parametrize("method", ["exact", "auto", "polynomial"])
def test_hf_llama_sdpa_rows_with_no_key_stay_finite(method, padding):
    """Issue 25: SDPA gives 0 on a query row that sees no key (left padding's first queries); the polynomial
    path gave NaN there, and the next layer's states took 0 * NaN = NaN from the padded keys, so every logit of
    the sequence was NaN. Every method now gives eager's logits (within the approximation) and finite
    gradients."""
    import almostlinear

    torch.manual_seed(0)
    model, ids, _ = build("llama", impl="sdpa", padding=True, layers=2, seq_len=64)
    model.eval()
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, : 20 if padding == "left" else 64] = 0
    reference = model(ids, attention_mask=mask).logits
    torch._dynamo.reset()
    backend = almostlinear.Backend(method=method, min_seq_len=0, inner="eager")
    out = torch.compile(model, backend=backend)(ids, attention_mask=mask).logits
    report = backend.reports[-1]
    assert bool(torch.isfinite(out).all()), str(report)
    error = float(((out - reference).norm() / reference.norm()).detach())
    assert error < (1e-5 if method == "exact" else 1e-2), (error, str(report))
    if method != "exact":
        assert report.grad_error is not None and report.grad_error < 1e-2, str(report)
        assert any(s.method == "polynomial" for s in report.sites), str(report)
        assert not report.warnings, str(report)
