"""Per-head decisions: the op on the heads that fit, exact attention on the others, in one rewritten site."""
import math

import pytest
import torch

import almostlinear
from almostlinear.kinds import Method
from almostlinear.rewriter.measure import gradient_error, run_with_grads
from almostlinear.rewriter.options import Options
from almostlinear.rewriter.pipeline import apply, prepare
from almostlinear.rewriter.policy import Decision
from almostlinear.zoo import build
from almostlinear.zoo.gpt import GPT, GPTConfig

T = 64


def _gpt_with_sharp_heads(sharp=(0, 1), n_head=4):
    """A GPT whose `sharp` heads have large logits (peaked attention) and whose other heads are diffuse."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=T, n_layer=2, n_head=n_head, n_embd=64, dropout=0.0))
    head_dim = 64 // n_head
    with torch.no_grad():
        for block in model.h:
            q_rows = block.attn.c_attn.weight  # rows [0, C) are q, head h at [h * head_dim, (h + 1) * head_dim)
            for h in range(n_head):
                q_rows[h * head_dim:(h + 1) * head_dim].mul_(8.0 if h in sharp else 0.3)
    return model


def test_auto_approximates_the_diffuse_heads_and_keeps_the_sharp_ones_exact():
    model = _gpt_with_sharp_heads()
    backend = almostlinear.Backend(budget=0.05, min_seq_len=0, inner="aot_eager")
    x = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(0))
    out = torch.compile(model, backend=backend)(x)
    report = backend.reports[-1]
    assert [s.method for s in report.sites] == ["polynomial", "polynomial"], str(report)
    for site in report.sites:
        assert site.approximated_heads == [2, 3], str(report)
        assert "coefficients chosen on key/value heads [2, 3]" in site.reason  # not on the sharp heads
        assert [h["approximated"] for h in site.heads] == [False, False, True, True]
        sharp, diffuse = site.heads[0], site.heads[3]
        assert sharp["logit_std"] > 4 * diffuse["logit_std"] and sharp["effective_keys"] < diffuse["effective_keys"]
    assert report.grad_error is not None and report.grad_error <= 0.05, str(report)
    assert "approximability map (4 of 8 heads approximated" in str(report)
    reference = model(x)
    assert float(((out - reference).norm() / reference.norm()).detach()) < 0.05


def _captured(name):
    model, ids, kwargs = build(name, padding=True, seq_len=24)
    graphs = []

    def grab(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=grab)(ids, **kwargs)
    return graphs[0]


def _forced(gm, inputs, heads):
    prepared = prepare(gm, inputs)
    assert prepared.sites
    decisions = {s.id: Decision(Method.POLYNOMIAL, "forced by the test", 2, None, None, heads) for s in prepared.sites}
    return apply(prepared, decisions, Options(min_seq_len=0, inner="eager"))


@pytest.mark.parametrize("name", ["llama", "gpt2"])  # GQA + causal + padding; MHA + causal
def test_split_sites_with_every_head_exact_equal_eager(name):
    gm, inputs = _captured(name)
    applied = _forced(gm, inputs, heads=())
    rng = torch.get_rng_state()
    assert all(int(b.sum()) == 0 for n, b in applied.graph_module.named_buffers() if "switch" in n)
    torch.testing.assert_close(applied.graph_module(*inputs), gm(*inputs), atol=1e-5, rtol=1e-5)
    ours, eager = run_with_grads(applied.graph_module, inputs, rng), run_with_grads(gm, inputs, rng)
    assert gradient_error(ours.grads, eager.grads) < 1e-5


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_mixed_heads_are_within_budget_and_differ_from_all_exact(name):
    gm, inputs = _captured(name)
    rng = torch.get_rng_state()
    eager = run_with_grads(gm, inputs, rng)
    mixed = run_with_grads(_forced(gm, inputs, heads=(0,)).graph_module, inputs, rng)
    full = run_with_grads(_forced(gm, inputs, heads=None).graph_module, inputs, rng)
    mixed_error, full_error = gradient_error(mixed.grads, eager.grads), gradient_error(full.grads, eager.grads)
    assert 0 < mixed_error <= 0.05 and math.isfinite(full_error)
    assert mixed_error < full_error  # half the heads exact: closer to eager than all approximated


def test_recheck_switches_only_the_heads_whose_logits_grew():
    model = _gpt_with_sharp_heads(sharp=())  # every head diffuse at first
    # guard=False: the run-time guard would run the grown heads exact on every call before the re-check sees them
    backend = almostlinear.Backend(budget=0.05, min_seq_len=0, inner="aot_eager", recheck_every=1, guard=False)
    compiled = torch.compile(model, backend=backend)
    x = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(0))
    compiled(x).sum().backward()
    report = backend.reports[-1]
    assert [s.method for s in report.sites] == ["polynomial", "polynomial"] and report.sites[0].approximated_heads is None
    with torch.no_grad():  # training made heads 0 and 1 of the first layer sharp
        model.h[0].attn.c_attn.weight[:32].mul_(40.0)
    compiled(x).sum().backward()
    first = report.sites[0]
    assert first.method == "polynomial" and first.approximated_heads == [2, 3], str(report)
    assert [h["approximated"] for h in first.heads] == [False, False, True, True]
    assert getattr(compiled, "_orig_mod", None) is model and len(backend.reports) == 1  # no recompile
    assert any("heads [0, 0, 1, 1]" in h.get("event", "") for h in report.history), report.history


def test_polynomial_method_fits_its_coefficients_on_every_head():
    """method="polynomial" approximates every head, so its coefficients are chosen on all of them (no per-head
    refit, whatever the heads' errors)."""
    model = _gpt_with_sharp_heads()
    backend = almostlinear.Backend(method="polynomial", budget=0.05, min_seq_len=0, inner="aot_eager")
    x = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(0))
    torch.compile(model, backend=backend)(x)
    report = backend.reports[-1]
    assert [s.method for s in report.sites] == ["polynomial", "polynomial"], str(report)
    for site in report.sites:
        assert site.approximated_heads is None and "coefficients chosen on" not in site.reason, str(report)
