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
