"""The error budget: approximate only where the measured end-to-end gradient error fits."""
import warnings

import pytest
import torch
import torch.nn as nn

import almostlinear
from almostlinear.rewriter.search import BudgetError
from almostlinear.zoo.gpt import GPT, GPTConfig

T = 64


def _gpt(seed=0, dropout=0.0, layers=2):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=T, n_layer=layers, n_head=2, n_embd=32, dropout=dropout))


def _tokens(seed=0):
    return torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(seed))


def _scale_logits(model, factor):
    """Grow the attention logits (q and k projections) as training would."""
    with torch.no_grad():
        for block in model.h:
            n = block.attn.n_embd
            block.attn.c_attn.weight[: 2 * n].mul_(factor)


def _compile(model, **options):
    options.setdefault("min_seq_len", 0)
    options.setdefault("inner", "aot_eager")
    backend = almostlinear.Backend(**options)
    return torch.compile(model, backend=backend), backend


def test_model_at_init_is_approximated_within_budget():
    model = _gpt()
    compiled, backend = _compile(model)
    compiled(_tokens())
    report = backend.reports[-1]
    assert [s.method for s in report.sites] == ["polynomial", "polynomial"], str(report)
    assert report.grad_error is not None and report.grad_error <= report.budget
    for site in report.sites:
        assert site.logit_bound > 0 and site.eps is not None and site.paper_degree >= 2
        assert site.measured_error is not None and site.measured_error < 0.05
    assert "planning took" in str(report)


def test_large_logits_stay_exact_and_strict_raises_naming_the_sites():
    model = _gpt()
    _scale_logits(model, 20.0)
    compiled, backend = _compile(model)
    compiled(_tokens())
    report = backend.reports[-1]
    assert [s.method for s in report.sites] == ["exact", "exact"], str(report)
    assert all("budget" in s.reason for s in report.sites)
    torch._dynamo.reset()
    compiled, backend = _compile(model, strict=True)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:  # Dynamo wraps backend errors
        compiled(_tokens())
    assert isinstance(info.value.inner_exception, BudgetError)
    message = str(info.value.inner_exception)
    assert "h.0.attn" in message and "h.1.attn" in message and "budget 0.05" in message


def test_back_off_returns_the_worst_site_to_exact_until_within_budget(monkeypatch):
    """With the calibration filter out of the way, the measured loop alone must reach the budget."""
    from almostlinear.rewriter import search

    real = search.calibrate

    def optimistic(*args, **kwargs):  # predicts that everything fits: every site is tried
        calibration = real(*args, **kwargs)
        calibration.sampled_error = 0.0
        calibration.group_errors = [0.0] * len(calibration.group_errors)
        return calibration

    monkeypatch.setattr(search, "calibrate", optimistic)
    model = _gpt(layers=3)
    with torch.no_grad():  # only the middle layer has large logits
        model.h[1].attn.c_attn.weight[:64].mul_(3.0)
    compiled, backend = _compile(model, budget=0.05)
    compiled(_tokens())
    report = backend.reports[-1]
    history = report.history
    assert history[0]["approximated"] == [0, 1, 2] and history[0]["grad_error"] > 0.05, str(report)
    worst = max(history[0]["site_errors"], key=history[0]["site_errors"].get)
    assert worst == 1
    assert history[-1]["approximated"] == [0, 2] and history[-1]["grad_error"] <= 0.05, str(report)
    assert [s.method for s in report.sites] == ["polynomial", "exact", "polynomial"]
    assert "largest measured error" in report.sites[1].reason
    assert report.grad_error == history[-1]["grad_error"]


def _grads(fn, params, x, cotangent_seed=20240, rows=None):
    out = fn(x)
    g = torch.Generator().manual_seed(cotangent_seed)
    cot = torch.randn(out.shape, generator=g)
    if rows is not None:  # cotangents on these batch rows only
        cot = cot * torch.zeros(out.shape[0]).index_fill(0, torch.tensor(rows), 1.0).reshape(-1, 1, 1)
    return torch.autograd.grad(out, params, cot)


def test_reported_error_equals_an_independent_recomputation():
    """measure_rows=None: on the held-out row 1 of the 2 at the example's batch (row 0 calibrated)."""
    model = _gpt()
    x = _tokens()
    compiled, backend = _compile(model, budget=0.5, measure_rows=None)
    compiled(x)
    report = backend.reports[-1]
    params = list(model.parameters())
    # cotangents on that row's logits only
    assert "held-out rows 1 of the example batch (" in str(report), str(report)
    got = _grads(compiled, params, x, rows=[1])
    ref = _grads(model, params, x, rows=[1])
    num = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(got, ref)))
    den = torch.sqrt(sum((b**2).sum() for b in ref))
    independent = float(num / den)
    assert independent > 0
    assert report.grad_error == pytest.approx(independent, rel=0.01)


def test_reported_error_on_a_row_of_its_own_equals_an_independent_recomputation():
    """The default: the held-out row 1 run as a batch of 1. Taylor coefficients and every head approximated, so a
    compile on that row alone is the same function."""
    model = _gpt()
    x = _tokens()
    options = dict(method="polynomial", coefficients="taylor")
    compiled, backend = _compile(model, **options)
    compiled(x)
    report = backend.reports[-1]
    assert "held-out rows 1 of the example batch, run as a batch of 1" in str(report), str(report)
    params, row = list(model.parameters()), x[[1]]
    got, ref = _grads(_compile(model, **options)[0], params, row), _grads(model, params, row)
    independent = float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(got, ref)))
                        / torch.sqrt(sum((b**2).sum() for b in ref)))
    assert independent > 0
    assert report.grad_error == pytest.approx(independent, rel=0.01)


class _WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.gpt = _gpt(dropout=0.2)
        for block in self.gpt.h:  # dropout everywhere but on the attention weights (the op has none)
            block.attn.attn_dropout.p = 0.0
        self.norm = nn.BatchNorm1d(96)

    def forward(self, x):
        return self.norm(self.gpt(x).transpose(1, 2))


def test_measuring_leaves_no_trace_and_uses_the_same_dropout_draws():
    model = _WithBatchNorm().train()
    x = _tokens()
    x_before = x.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    backend = almostlinear.Backend(min_seq_len=0, inner="aot_eager")
    from almostlinear.rewriter.backend import transform

    gm_holder = {}

    def capture(gm, example_inputs):
        gm_holder["report"], _ = transform(gm, example_inputs, backend.options)
        assert torch.equal(torch.get_rng_state(), rng), "measuring changed the global RNG state"
        for name, value in model.state_dict().items():
            assert torch.equal(value, state[name]), f"measuring changed {name}"
        return gm.forward

    torch.compile(model, backend=capture)(x)
    assert torch.equal(x, x_before)
    assert all(p.grad is None for p in model.parameters())
    report = gm_holder["report"]
    # the residual, MLP and embedding dropouts draw the same masks in both measured runs: otherwise the
    # error would be of order 1
    assert {s.method for s in report.sites} == {"polynomial"}, str(report)
    assert report.grad_error is not None and report.grad_error < 0.05, str(report)


def test_per_model_budgets_keep_their_own_decisions():
    a, b = _gpt(seed=1), _gpt(seed=1)
    compiled_a, backend_a = _compile(a, budget=1e-6)
    compiled_b, backend_b = _compile(b, budget=0.2)
    compiled_a(_tokens())
    compiled_b(_tokens())
    assert {s.method for s in backend_a.reports[-1].sites} == {"exact"}
    assert {s.method for s in backend_b.reports[-1].sites} == {"polynomial"}


def test_sites_option_overrides_by_module_path_glob():
    compiled, backend = _compile(_gpt(), sites={"h.0.*": "exact", "h.1.attn": "skip"})
    compiled(_tokens())
    methods = {s.module_path: s.method for s in backend.reports[-1].sites}
    assert methods == {"h.0.attn": "exact", "h.1.attn": "unchanged"}
    assert "sites option 'h.0.*'" in backend.reports[-1].sites[0].reason


def test_polynomial_method_has_no_gate_and_records_the_distance_to_softmax():
    """method="polynomial" trains with polynomial attention: far beyond the budget it approximates every site,
    warns nothing, and reports the measured distance as information."""
    model = _gpt()
    _scale_logits(model, 20.0)
    compiled, backend = _compile(model, method="polynomial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        compiled(_tokens())
    report = backend.reports[-1]
    assert {s.method for s in report.sites} == {"polynomial"}
    assert report.grad_error is not None and report.grad_error > 0.05, str(report)
    assert "distance to softmax attention" in str(report) and "OVER" not in str(report)


def test_polynomial_method_rechecks_measure_but_never_switch():
    model = _gpt()
    compiled, backend = _compile(model, method="polynomial", recheck_every=1)
    x = _tokens()
    compiled(x).sum().backward()
    _scale_logits(model, 20.0)  # far beyond the budget now
    compiled(x).sum().backward()
    report = backend.reports[-1]
    checks = [h for h in report.history if "site" in h]
    assert checks and all(h["decision"] == "polynomial" for h in checks), report.history
    assert max(h["measured_error"] for h in checks) > 0.05
    assert {s.method for s in report.sites} == {"polynomial"}


@pytest.mark.parametrize("inner", ["aot_eager", pytest.param("inductor", marks=pytest.mark.inductor)])
def test_recheck_switches_a_site_to_exact_when_its_logits_grow(inner):
    model = _gpt()
    # guard=False: the run-time guard would run the grown site exact on every call before the re-check sees it
    compiled, backend = _compile(model, recheck_every=2, inner=inner, guard=False)
    x = _tokens()
    compiled(x).sum().backward()  # call 1: compiles, both sites approximated
    report = backend.reports[-1]
    assert {s.method for s in report.sites} == {"polynomial"}
    compiled(x).sum().backward()  # call 2: re-check, small logits, kept
    assert [h["decision"] for h in report.history if "site" in h] == ["polynomial", "polynomial"]
    with torch.no_grad():  # training made layer 1's logits grow
        model.h[1].attn.c_attn.weight[:64].mul_(20.0)
    compiled(x).sum().backward()  # call 3
    compiled(x).sum().backward()  # call 4: re-check switches site 1
    checks = [h for h in report.history if h.get("call") == 4 and "site" in h]
    assert [(h["site"], h["decision"]) for h in checks] == [(0, "polynomial"), (1, "exact")]
    assert report.sites[1].method == "exact" and "switched to exact at call 4" in report.sites[1].reason
    assert report.grad_error is not None and report.grad_error <= report.budget or report.sites[0].method == "exact"
    # from now on the switched sites are exact, forward and backward, without a recompile: the graph equals
    # one compiled with those decisions from the start
    decided = {f"h.{s.id}.attn": ("polynomial" if s.method == "polynomial" else "exact") for s in report.sites}
    out = compiled(x)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(out, list(model.parameters()), cot)
    assert len(backend.reports) == 1, "no recompile"
    torch._dynamo.reset()
    reference_backend = almostlinear.Backend(method="exact", inner="aot_eager", min_seq_len=0, sites=decided)
    reference = torch.compile(model, backend=reference_backend)
    ref_out = reference(x)
    assert [s.method for s in reference_backend.reports[-1].sites] == [s.method for s in report.sites]
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    ref_grads = torch.autograd.grad(ref_out, list(model.parameters()), cot)
    # the switched site's exact backward (query-blocked) and SDPA's differ in round-off only, amplified by the
    # very sharp softmax of the grown logits: compare as one relative norm
    num = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(grads, ref_grads)))
    assert float(num / torch.sqrt(sum((b**2).sum() for b in ref_grads))) < 1e-3
