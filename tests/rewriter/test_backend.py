"""Backend behaviour: no-attention graphs, side-effect freedom, reports, logging and the trace artifact."""
import logging

import pytest
import torch
import torch.nn as nn

import almostlinear
from almostlinear.zoo.gpt import GPT, GPTConfig
from tests.oracle import assert_exact_oracle


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x).softmax(dim=-1)  # a softmax, but no attention


def test_model_without_attention_passes_through_unchanged():
    torch.manual_seed(0)
    model = NoAttention().eval()
    report = assert_exact_oracle(model, (torch.randn(5, 8),), expect_sites=0)
    assert report.sites == []
    assert len(report.near_misses) == 1
    assert "not a matmul with values" in report.near_misses[0].reason
    assert report.graph_after.count("softmax") == report.graph_before.count("softmax")


def _state(model):
    return {k: v.detach().clone() for k, v in list(model.named_parameters()) + list(model.named_buffers())}


@pytest.mark.parametrize("inner", ["aot_eager", "eager"])
def test_compiling_changes_no_parameter_buffer_or_input(inner):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))
    tokens = torch.randint(0, 96, (2, 16))
    tokens_before = tokens.clone()
    before = _state(model)
    backend = almostlinear.Backend(inner=inner)
    compiled = torch.compile(model, backend=backend)
    compiled(tokens)
    after = _state(model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert torch.equal(tokens, tokens_before)


def test_explain_restores_batchnorm_stats_and_rng():
    torch.manual_seed(0)
    model = NoAttention().train()
    before = _state(model)
    x = torch.randn(6, 8)
    rng = torch.get_rng_state()
    almostlinear.explain(model, x)
    assert torch.equal(torch.get_rng_state(), rng)
    after = _state(model)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_report_fields_table_and_json():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    report = almostlinear.explain(model, torch.randint(0, 96, (2, 16)))
    text = str(report)
    assert "h.0.attn" in text and "h.1.attn" in text and "causal" in text
    site = report.sites[0]
    assert site.q_shape == (2, 2, 16, 16) and site.k_shape == (2, 2, 16, 16)
    assert site.scale == pytest.approx(0.25)
    assert site.rewritten and site.method == "exact" and "is_causal=True" in site.reason
    assert "softmax" in report.graph_before and "softmax" not in report.graph_after
    data = report.as_dict()
    assert data["sites"][0]["module_path"] == "h.0.attn"
    assert '"mask_kind": "causal"' in report.to_json()


def test_rewrites_are_logged_on_the_almostlinear_logger(caplog):
    q = torch.randn(1, 2, 8, 4)
    with caplog.at_level(logging.INFO, logger="almostlinear"):
        almostlinear.explain(lambda a, b, c: (a @ b.mT).softmax(-1) @ c, q, q, q)
    messages = [r.getMessage() for r in caplog.records if r.name == "almostlinear"]
    assert any("site 0" in m and "-> exact" in m for m in messages), messages


def test_report_is_emitted_as_structured_trace_artifact(monkeypatch):
    seen = []

    def fake_trace(name, metadata_fn=None, payload_fn=None, **kwargs):
        if name == "artifact" and metadata_fn().get("name") == "almostlinear_report":
            seen.append(payload_fn())

    import torch._logging

    monkeypatch.setattr(torch._logging, "trace_structured", fake_trace)
    q = torch.randn(1, 2, 8, 4)
    almostlinear.explain(lambda a, b, c: (a @ b.mT).softmax(-1) @ c, q, q, q)
    assert seen and '"mask_kind": "none"' in seen[-1]


def test_backend_object_keeps_reports_per_model():
    q = torch.randn(1, 2, 8, 4)
    b1, b2 = almostlinear.Backend(inner="eager", budget=0.01), almostlinear.Backend(inner="eager", budget=0.2)
    torch.compile(lambda a: (a @ a.mT).softmax(-1) @ a, backend=b1)(q)
    torch.compile(lambda a: (a @ a.mT * 0.1).softmax(-1) @ a, backend=b2)(q)
    assert len(b1.reports) == 1 and len(b2.reports) == 1
    assert b1.reports[0].budget == 0.01 and b2.reports[0].budget == 0.2
