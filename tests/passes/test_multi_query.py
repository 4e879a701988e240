"""Falcon's spelling: in-place score scaling and multi-query attention as a broadcasting matmul."""
from __future__ import annotations

import pytest
import torch

import almostlinear


class FalconStyle(torch.nn.Module):
    def forward(self, q, k, v):  # q [B, H, L, D], k/v [B, 1, S, D]
        i = torch.arange(q.shape[-2])
        mask = torch.where(i[None, :] <= i[:, None], 0.0, torch.finfo(q.dtype).min)
        scores = q @ k.transpose(-1, -2)
        scores /= 4.0  # in place on a fresh intermediate
        return torch.softmax(scores + mask, dim=-1) @ v


def _inputs(scale: float = 1.0):
    g = torch.Generator().manual_seed(0)
    q = scale * torch.randn(2, 4, 16, 16, generator=g)
    k, v = scale * torch.randn(2, 1, 16, 16, generator=g), torch.randn(2, 1, 16, 16, generator=g)
    return [q, k, v]


def _run(fn, inputs):
    args = [x.clone().requires_grad_(x.dtype.is_floating_point and i < 3) for i, x in enumerate(inputs)]
    out = fn(*args)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return [out.detach()] + [a.grad for a in args[:3]]


@pytest.mark.parametrize("method", ["exact", "polynomial"])
def test_falcon_multi_query_in_place_scale_is_found_and_equals_eager(method):
    model = FalconStyle()
    inputs = _inputs(1.0 if method == "exact" else 0.1)
    backend = almostlinear.Backend(method=method, inner="eager", min_seq_len=0)
    got, expected = _run(torch.compile(model, backend=backend), inputs), _run(model, inputs)
    report = backend.reports[-1]
    assert len(report.sites) == 1 and report.sites[0].method == method, report
    assert report.sites[0].gqa_groups == 4 and report.sites[0].mask_kind == "causal", report
    tolerance = 1e-5 if method == "exact" else 5e-3
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)


def test_an_in_place_op_on_a_private_dead_copy_is_dead():
    """`c = w.clone(); c.mul_(2)` with c never read: nothing observes the mutation, so the site is found."""
    from tests.passes.spellings import mutates_dead_clone, qkv
    from tests.oracle import assert_exact_oracle

    report = assert_exact_oracle(mutates_dead_clone, qkv(), inner="eager")
    assert len(report.sites) == 1 and report.sites[0].rewritten, report
