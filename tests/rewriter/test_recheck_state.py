"""Re-checks and planning run extra passes of the captured graph: they must leave the model's buffers alone.

BatchNorm's running statistics and num_batches_tracked are inputs of the captured graph that it mutates in
place; a measuring pass on the live tensors updates them a second time.
"""
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import almostlinear
from almostlinear.rewriter.measure import run_with_grads


def Bk(**options):
    return almostlinear.Backend(min_seq_len=0, inner=options.pop("inner", "eager"), **options)


class _NormAttentionNorm(nn.Module):
    """BatchNorm1d over the features before and after one softmax attention block."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm_in = nn.BatchNorm1d(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_out = nn.BatchNorm1d(dim)

    def forward(self, x):  # [B, T, dim]
        B, T, C = x.shape
        # BatchNorm1d over the features of the B*T tokens ([B, C, T] with transposes trips a stride bug of
        # plain aot_eager in the linear that follows, unrelated to almostlinear)
        x = self.norm_in(x.reshape(B * T, C)).reshape(B, T, C)
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5, dim=-1) @ v
        a = a.transpose(1, 2).reshape(B, T, C)
        return self.norm_out(a.reshape(B * T, C)).reshape(B, T, C)


def _model(seed=0):
    torch.manual_seed(seed)
    return _NormAttentionNorm().train()


def _x(seed=1):
    return torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(seed))


def _assert_buffers_equal(model, reference, names=None, atol=1e-6):
    ref = dict(reference.named_buffers())
    for name, value in model.named_buffers():
        if names is not None and not any(name.startswith(n) for n in names):
            continue
        if value.dtype == torch.long:
            assert torch.equal(value, ref[name]), f"{name}: {value} != {ref[name]}"
        else:
            torch.testing.assert_close(value, ref[name], atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_rechecks_do_not_update_batchnorm_buffers_again(inner):
    model = _model()
    eager, no_rechecks = copy.deepcopy(model), copy.deepcopy(model)
    # budget 0.5: the site stays approximated, so every call re-checks it
    backend = Bk(method="polynomial", recheck_every=1, budget=0.5, inner=inner)
    compiled = torch.compile(model, backend=backend)
    plain = torch.compile(no_rechecks, backend=Bk(method="polynomial", budget=0.5, inner=inner))
    x = _x()
    for _ in range(3):
        compiled(x).sum().backward()
        plain(x).sum().backward()
        eager(x).sum().backward()
    report = backend.reports[-1]
    assert [s.method for s in report.sites] == ["polynomial"], str(report)
    assert [h["call"] for h in report.history if "site" in h] == [1, 2, 3], str(report)
    assert int(model.norm_in.num_batches_tracked) == int(model.norm_out.num_batches_tracked) == 3
    # the same forward values as the compiled model without re-checks (the polynomial op both times)
    _assert_buffers_equal(model, no_rechecks)
    # before the attention the values equal eager's; after it they carry the approximation
    _assert_buffers_equal(model, eager, names=["norm_in"])
    _assert_buffers_equal(model, eager, names=["norm_out.num_batches_tracked"])


@pytest.mark.parametrize("budget", [1e-9, 0.5])  # planning keeps the site exact / approximates it
def test_planning_does_not_update_batchnorm_buffers(budget):
    model = _model()
    eager = copy.deepcopy(model)
    backend = Bk(method="auto", budget=budget)
    compiled = torch.compile(model, backend=backend)
    x = _x()
    compiled(x).sum().backward()
    eager(x).sum().backward()
    report = backend.reports[-1]
    assert report.history and report.history[0]["call"] == 0, "planning ran"
    assert [s.method for s in report.sites] == (["exact"] if budget < 1e-3 else ["polynomial"]), str(report)
    if report.sites[0].method == "exact":
        _assert_buffers_equal(model, eager)
    else:
        _assert_buffers_equal(model, eager, names=["norm_in", "norm_out.num_batches_tracked"])


@pytest.mark.parametrize("train", [True, False])
def test_frozen_model_with_batchnorm_compiles_and_plans_without_side_effects(train):
    """No input requires grad: the measured gradient is w.r.t. the parameters, never the running stats
    (a running_mean clone that requires grad fails BatchNorm's forward)."""
    model = _model().train(train).requires_grad_(False)
    eager = copy.deepcopy(model)
    backend = Bk(method="auto", budget=0.5)
    out = torch.compile(model, backend=backend)(_x())
    assert out.shape == eager(_x()).shape and bool(torch.isfinite(out).all())
    assert backend.reports[-1].grad_error is not None
    _assert_buffers_equal(model, eager, names=["norm_in", "norm_out.num_batches_tracked"])


class _CountingBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(3))
        self.weight = nn.Parameter(torch.ones(3))

    def forward(self, x):
        self.total.add_(x.detach().sum(0))
        return x * self.weight


def test_measuring_runs_clone_buffers_the_graph_reads_as_attributes():
    """A graph that reads its buffers with get_attr (not as inputs) mutates copies when measured."""
    module = _CountingBuffer()
    gm = fx.symbolic_trace(module)
    assert "total" in {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    x = torch.randn(4, 3, requires_grad=True)
    measurement = run_with_grads(gm, [x], torch.get_rng_state())
    assert torch.equal(gm.total, torch.zeros(3))
    assert len(measurement.grads) == 1 and measurement.finite()
