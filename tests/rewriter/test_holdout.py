"""The planning error is measured on batch rows that calibration did not see (rewriter/holdout.py)."""
from __future__ import annotations

import torch

import almostlinear
from almostlinear.rewriter.holdout import batch_split


class _Layer(torch.nn.Module):
    """One attention layer with parameters and a mean-squared loss over the batch rows."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.qkv, self.proj, self.heads = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d), heads

    def forward(self, x, y):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return ((self.proj(o.transpose(1, 2).reshape(B, T, C)) - y) ** 2).mean()


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    model(x, y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_the_split_repeats_the_held_out_rows_and_leaves_other_inputs_whole():
    gm = torch.fx.symbolic_trace(lambda x, y, table: x + y.sum() + table.sum())
    x, y, table = torch.arange(6.0).reshape(6, 1), torch.zeros(6, 3), torch.ones(1, 4)
    split, why = batch_split(gm, [x, y, table])
    assert why == "" and split.size == 6 and split.fit.tolist() == [0, 1, 2] and split.held_out.tolist() == [3, 4, 5]
    held = split.held_out_inputs([x, y, table])
    assert held[0].flatten().tolist() == [3.0, 4.0, 5.0, 3.0, 4.0, 5.0] and held[2] is table
    assert split.fit_rows(torch.arange(6)).tolist() == [0, 1, 2] and split.fit_rows(torch.arange(4)).shape == (4,)
    assert "held-out rows 3-5" in split.describe() and "rows 0-2" in split.describe()


def test_no_split_where_the_batch_dimension_cannot_be_told():
    gm = torch.fx.symbolic_trace(lambda x, y: x.sum() + y.sum())
    assert batch_split(gm, [torch.zeros(4, 2), torch.zeros(3, 2)]) == (
        None, "the inputs' first dimensions differ ([3, 4]): no batch dimension to split")
    assert batch_split(gm, [torch.zeros(1, 2), torch.zeros(1, 5)])[1] == "no input has a batch dimension larger than 1"
    assert batch_split(gm, [torch.zeros(0, 2), torch.zeros(0, 5)])[1] == "the batch is empty"


def test_the_planning_figure_is_the_held_out_rows_error_and_the_report_says_so():
    """The report's gradient error equals the error of the compiled model's gradients on the held-out rows
    (repeated to the batch size), measured independently here; the report names the rows."""
    torch.manual_seed(0)
    model = _Layer()
    g = torch.Generator().manual_seed(1)
    x, y = 0.7 * torch.randn(4, 32, 16, generator=g), torch.randn(4, 32, 16, generator=g)
    backend = almostlinear.Backend(method="polynomial", min_seq_len=0, inner="eager")
    compiled = torch.compile(model, backend=backend)
    _grads(compiled, x, y)
    report = backend.reports[-1]
    rows = torch.tensor([2, 3, 2, 3])
    exact, approx = _grads(model, x[rows], y[rows]), _grads(compiled, x[rows], y[rows])
    expected = float((approx - exact).norm() / exact.norm())
    assert report.grad_error is not None and abs(report.grad_error - expected) <= 1e-3 * expected + 1e-7, (
        report.grad_error, expected)
    in_sample = float((_grads(compiled, x, y) - _grads(model, x, y)).norm() / _grads(model, x, y).norm())
    assert abs(report.grad_error - in_sample) > 1e-3 * in_sample  # not the in-sample figure
    assert "held-out rows 2-3 of the example batch" in str(report), str(report)
