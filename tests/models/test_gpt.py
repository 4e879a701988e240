"""Exact-mode oracle on a small GPT with causal self-attention, for each inner compiler."""
import pytest
import torch

from almostlinear.zoo import GPT, GPTConfig
from tests.oracle import assert_exact_oracle


def _model_and_tokens(dropout: float = 0.0, T: int = 16):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=dropout))
    tokens = torch.randint(0, model.config.vocab_size, (2, T))
    return model, tokens


@pytest.mark.parametrize("inner", ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.inductor)])
def test_gpt_exact_equals_eager(inner):
    model, tokens = _model_and_tokens()
    report = assert_exact_oracle(model, (tokens,), inner=inner, expect_sites=2)
    for i, site in enumerate(report.sites):
        assert site.module_path == f"h.{i}.attn"
        assert site.mask_kind == "causal" and site.causal
        assert site.rewritten and site.method == "exact"
        assert site.residual is not None, "the residual add around c_proj is recorded"
        assert "gpt.py" in site.source_line
    assert report.graph_after.count("torch._C._nn.scaled_dot_product_attention(") == 2
    assert "is_causal = True" in report.graph_after


def test_gpt_eval_mode_and_dynamic_lengths():
    model, tokens = _model_and_tokens(dropout=0.1, T=12)
    model.eval()
    report = assert_exact_oracle(model, (tokens,), dynamic=True, expect_sites=2)
    assert all(s.mask_kind == "causal" for s in report.sites)


def test_gpt_train_mode_dropout_is_carried_into_sdpa():
    model, tokens = _model_and_tokens(dropout=0.25)
    model.train()
    import almostlinear

    report = almostlinear.explain(model, tokens, method="exact")
    assert [s.dropout_p for s in report.sites] == [0.25, 0.25]
    assert "dropout_p = 0.25" in report.graph_after
