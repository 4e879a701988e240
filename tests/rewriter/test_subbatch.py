"""Planning measures on a few held-out rows run as a batch of their own (rewriter/subbatch.py): the graph resized,
checked against the whole batch, and the whole batch wherever the resized graph is not the same function."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import almostlinear
from almostlinear.rewriter.subbatch import resize_batch, rows_agree


class _Layer(torch.nn.Module):
    """x [B, T, C] -> attention over `heads` heads -> output rows. `literal_heads`: the head split spelled with
    literal sizes and -1 for the head dim (view(B, T, heads, -1)), so that heads == B is ambiguous to a resize."""

    def __init__(self, d: int = 16, heads: int = 2, dropout: float = 0.0, norm: bool = False):
        super().__init__()
        self.qkv, self.proj, self.heads, self.dropout = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d), heads, dropout
        self.norm = torch.nn.BatchNorm1d(d) if norm else None

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(C, -1))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        o = F.dropout(self.proj(o), self.dropout, self.training)
        if self.norm is not None:  # batch statistics: a row's output depends on the other rows
            o = self.norm(o.transpose(1, 2)).transpose(1, 2)
        return o


def _captured(model, x):
    """The graph Dynamo captures (static shapes) and its inputs (the parameters are inputs)."""
    seen = []

    def keep(gm, inputs):
        seen.append((gm, list(inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=keep)(x)
    gm, inputs = seen[0]
    return gm, [x if isinstance(t, torch.Tensor) and t.shape == x.shape else t for t in inputs]


def _planned(model, x, **options):
    backend = almostlinear.Backend(method="polynomial", min_seq_len=0, inner="eager", **options)
    torch.compile(model, backend=backend)(x)
    return backend.reports[-1]


def _x(batch: int, seed: int = 1, d: int = 16):
    return 0.7 * torch.randn(batch, 32, d, generator=torch.Generator().manual_seed(seed))


def test_the_figure_is_the_error_on_the_first_held_out_rows_as_their_own_batch():
    torch.manual_seed(0)
    model = _Layer()
    x = _x(8)
    report = _planned(model, x, coefficients="taylor")  # the same function whatever the batch it is compiled on
    assert "held-out rows 1, 3 of the example batch, run as a batch of 2" in str(report), str(report)
    compiled = torch.compile(model, backend=almostlinear.Backend(method="polynomial", min_seq_len=0, inner="eager",
                                                                 coefficients="taylor"))
    rows = x[[1, 3]]
    cot = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(20240))

    def grads(fn):
        return torch.cat([g.flatten() for g in torch.autograd.grad(fn(rows), list(model.parameters()), cot)])

    exact, approx = grads(model), grads(compiled)
    expected = float((approx - exact).norm() / exact.norm())
    assert report.grad_error > 0 and abs(report.grad_error - expected) <= 1e-3 * expected, (report.grad_error, expected)


def test_more_rows_measure_on_more_rows_and_none_on_the_whole_batch():
    torch.manual_seed(0)
    model = _Layer()
    assert "held-out rows 1, 3, 5 of the example batch, run as a batch of 3" in str(_planned(model, _x(8), measure_rows=3))
    whole = str(_planned(model, _x(8), measure_rows=None))
    assert "held-out rows 1, 3, 5, 7 of the example batch (" in whole and "run as a batch" not in whole, whole


class _Sizes(torch.nn.Module):
    def forward(self, x):
        B = x.shape[0]
        rows = torch.arange(B) + torch.arange(0, B, 1) + torch.full((B,), 4.0)  # the fill value 4 is no size
        return x.view(B, -1).expand(B, 6) * rows[:, None] + torch.zeros(B, 1) + x.new_zeros((B, 1))


def test_the_resize_changes_the_batch_in_size_arguments_only():
    x = torch.arange(24.0).reshape(4, 6)
    gm, inputs = _captured(_Sizes(), x)
    resized, node_map = resize_batch(gm, 4, 2)
    assert torch.equal(resized(x[:2])[0], gm(x)[0][:2])  # every size argument resized, the fill value left
    assert all(n in node_map for n in gm.graph.nodes if n.op != "output")  # (site errors map back through it)


def test_a_head_count_equal_to_the_batch_is_left_alone():
    """view(B, T, heads, -1) with heads == B == 4: only the first 4 (the batch leads a size) becomes 2."""
    torch.manual_seed(0)
    x = _x(4)
    gm, inputs = _captured(_Layer(heads=4), x)
    resized, _ = resize_batch(gm, 4, 2)
    rows = [t[[1, 3]] if t is x else t for t in inputs]
    assert rows_agree([resized(*rows)[0]], [gm(*inputs)[0]], torch.tensor([1, 3]), 4)
    assert "run as a batch of 2" in str(_planned(_Layer(heads=4), x))


class _SequenceFirst(torch.nn.Module):
    """x [T, B, C] (nn.MultiheadAttention's default layout) with T == B == 4: dim 0 is the sequence."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.qkv, self.proj, self.heads = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d), heads

    def forward(self, x):
        T, B, C = x.shape
        q, k, v = (t.view(T, B, self.heads, -1).permute(1, 2, 0, 3) for t in self.qkv(x).split(C, -1))
        return self.proj(F.scaled_dot_product_attention(q, k, v).permute(2, 0, 1, 3).reshape(T, B, C))


def test_a_wrong_resize_is_caught_and_the_whole_batch_is_measured():
    """Sequence-first with T == B: dim 0 is taken for the batch (it is the sequence) and view(T, B, H, -1) becomes
    view(2, B, H, -1): the copy runs, as another function. The check against the whole batch catches it, and the
    figure is the one measured at the example's batch."""
    torch.manual_seed(0)
    model = _SequenceFirst()
    x = 0.7 * torch.randn(4, 4, 16, generator=torch.Generator().manual_seed(1))
    gm, inputs = _captured(model, x)
    resized, _ = resize_batch(gm, 4, 2)
    rows = [t[[1, 3]] if t is x else t for t in inputs]
    assert resized(*rows)[0].shape == (2, 4, 16)  # it runs ...
    assert not rows_agree([resized(*rows)[0]], [gm(*inputs)[0]], torch.tensor([1, 3]), 4)  # ... as another function
    report = _planned(model, x)
    text = str(report)
    assert "held-out rows 1, 3 of the example batch (" in text and "does not equal the whole batch's" in text, text
    assert report.grad_error == pytest.approx(_planned(model, x, measure_rows=None).grad_error, rel=1e-6)


def test_rows_that_depend_on_each_other_are_measured_on_the_whole_batch():
    torch.manual_seed(0)
    model = _Layer(norm=True).train()
    report = _planned(model, _x(8))
    assert "does not equal the whole batch's" in str(report), str(report)


def test_dropout_is_switched_off_for_the_check_only():
    """Training with dropout: the check compares with the dropouts off; the measured runs keep them (the same draws
    on the exact and the approximated side, so method='exact'-like sites measure 0)."""
    torch.manual_seed(0)
    model = _Layer(dropout=0.3).train()
    report = _planned(model, _x(8))
    assert "run as a batch of 2" in str(report), str(report)
    backend = almostlinear.Backend(method="auto", budget=1e-9, min_seq_len=0, inner="eager")
    torch.compile(model, backend=backend)(_x(8))
    assert backend.reports[-1].sites[0].method == "exact" and "run as a batch of 2" in str(backend.reports[-1])


class _Loss(_Layer):
    """The layer with its loss inside (the output mixes the rows): a mean over rows, or a sum."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, x, y):
        return F.mse_loss(super().forward(x), y, reduction=self.reduction)


def test_a_loss_inside_the_model_is_measured_on_the_rows_as_their_own_batch():
    """A mean loss over the rows: the resized graph is checked against the exact graph on the rows tiled to the
    example's batch; the figure is the error of the loss's gradients on rows 1, 3 alone."""
    torch.manual_seed(0)
    model = _Loss()
    x, y = _x(8), _x(8, seed=2)
    backend = almostlinear.Backend(method="polynomial", min_seq_len=0, inner="eager", coefficients="taylor")
    torch.compile(model, backend=backend)(x, y)
    report = backend.reports[-1]
    assert "held-out rows 1, 3 of the example batch, run as a batch of 2" in str(report), str(report)
    compiled = torch.compile(model, backend=almostlinear.Backend(method="polynomial", min_seq_len=0, inner="eager",
                                                                 coefficients="taylor"))

    def grads(fn):
        return torch.cat([g.flatten() for g in torch.autograd.grad(fn(x[[1, 3]], y[[1, 3]]),
                                                                   list(model.parameters()))])

    exact, approx = grads(model), grads(compiled)
    expected = float((approx - exact).norm() / exact.norm())
    assert report.grad_error > 0 and abs(report.grad_error - expected) <= 1e-3 * expected, (report.grad_error, expected)


def test_a_summed_loss_is_measured_on_the_repeated_rows():
    """A sum over rows: the tiled batch's loss is 4x the rows' (not the same function): the held-out rows are
    repeated to the example's batch, as before."""
    torch.manual_seed(0)
    backend = almostlinear.Backend(method="polynomial", min_seq_len=0, inner="eager")
    torch.compile(_Loss("sum"), backend=backend)(_x(8), _x(8, seed=2))
    text = str(backend.reports[-1])
    assert "does not equal the whole batch's" in text and "run as a batch" not in text, text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_measured_on_two_rows(dtype):
    """The check allows the output dtype's rounding (a different matmul blocking on fewer rows)."""
    torch.manual_seed(0)
    model = _Layer(d=64, heads=4).to(dtype)
    x = (0.7 * torch.randn(8, 128, 64, generator=torch.Generator().manual_seed(1))).to(dtype)
    report = _planned(model, x)
    assert "run as a batch of 2" in str(report) and 0 < report.grad_error <= 0.05, str(report)


def test_measure_rows_is_validated():
    with pytest.raises(ValueError, match=r"measure_rows must be None \(every held-out row\) or an int >= 1, got 0"):
        almostlinear.Backend(measure_rows=0)
    with pytest.raises(ValueError, match="measure_rows"):
        almostlinear.Backend(measure_rows=1.5)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_hugging_face_models_are_measured_on_two_rows(name):
    """HF Llama with labels (the loss inside: checked against the rows tiled; head dim 8 == batch 8 left alone) and
    BERT (hidden states: checked against the capture pass's rows)."""
    from almostlinear import zoo

    model, _, _ = zoo.build(name, layers=2, seq_len=64)
    ids = torch.randint(0, 100, (8, 64), generator=torch.Generator().manual_seed(0))
    backend = almostlinear.Backend(method="auto", min_seq_len=0, inner="eager")
    torch.compile(model.train(), backend=backend)(ids, **({"labels": ids} if name == "llama" else {}))
    report = backend.reports[-1]
    assert "held-out rows 1, 3 of the example batch, run as a batch of 2" in str(report), str(report)
    assert report.grad_error is not None and report.grad_error <= 0.05
