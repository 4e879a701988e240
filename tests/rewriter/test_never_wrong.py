"""Regression tests from the bad-input battery (issue "Never wrong, never crashed"): masks and rows."""
from __future__ import annotations

import pytest
import torch

import almostlinear


def Bk(**options):
    return almostlinear.Backend(min_seq_len=0, inner="eager", **options)


class StaticKeyMask(torch.nn.Module):
    """A registered mask that removes the same key (the last one) for every query."""

    def __init__(self, T: int):
        super().__init__()
        keep = torch.ones(T, T, dtype=torch.bool)
        keep[:, -1] = False
        self.register_buffer("keep", keep)

    def forward(self, q, k, v):
        return (q @ k.mT / 32**0.5).masked_fill(~self.keep, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("method", ["auto", "polynomial"])
def test_static_per_key_mask_is_kept_on_the_polynomial_path(method):
    T = 256
    torch.manual_seed(0)
    q, k, v = (0.3 * torch.randn(1, 2, T, 32) for _ in range(3))
    model = StaticKeyMask(T)
    backend = Bk(method=method)
    compiled = torch.compile(model, backend=backend)
    compiled(q, k, v)
    site = backend.reports[-1].sites[0]
    assert site.mask_kind == "key_padding" and site.method == "polynomial", backend.reports[-1]
    v2 = v.clone()
    v2[:, :, -1] = 5.0  # the masked key's value must never reach the output
    expected, got = model(q, k, v2), compiled(q, k, v2)
    assert float((got - expected).norm() / expected.norm()) < 0.02
