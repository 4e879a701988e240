"""Fake kernels compute shapes only, and no cache of feature tables ever holds fake tensors.

The op's fake kernel used to build the degree-2 feature tables (for the state's rank) under the FakeTensorMode,
element by element: the first non-causal compile took 17 s at d = 64, 66 s at d = 128, 236 s at d = 256.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from almostlinear.kernels import cpu, features, naive_poly_attention
from almostlinear.kernels.features import FeatureMap, Quad2Features, fast_feature_map, fast_rank, feature_map
from almostlinear.kernels import switchable  # noqa: F401  (registers the switchable op)
from almostlinear.kernels.cpu import context as cpu_context

from tests.kernels.kernel_helpers import make_inputs

OP = torch.ops.almostlinear.poly_attention.default
BWD = torch.ops.almostlinear.poly_attention_backward.default
SWITCHABLE = torch.ops.almostlinear.switchable_attention.default
SWITCHABLE_BWD = torch.ops.almostlinear.switchable_attention_backward.default


@pytest.fixture
def no_feature_tables(monkeypatch):
    """Every way of building feature tables raises."""
    def boom(*args, **kwargs):
        raise AssertionError("a fake kernel built feature tables")

    monkeypatch.setattr(Quad2Features, "__init__", boom)
    monkeypatch.setattr(FeatureMap, "__init__", boom)
    for name in ("fast_feature_map", "feature_map", "_feature_map_cached", "_quad2_features"):
        monkeypatch.setattr(features, name, boom, raising=False)
    monkeypatch.setattr(cpu_context, "fast_feature_map", boom)
    monkeypatch.setattr(cpu_context, "feature_map_for", boom)


def _fake_inputs(mode, d, dv=None, L=256, hq=2, hk=2, alibi=False):
    with mode:
        q = torch.empty(1, hq, L, d)
        k = torch.empty(1, hk, L, d)
        v = torch.empty(1, hk, L, dv or d)
        slopes = torch.empty(hq) if alibi else None
    return q, k, v, slopes


@pytest.mark.parametrize("d,degree", [(128, 2), (256, 2), (40, 2), (12, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_fake_kernels_build_no_feature_tables(no_feature_tables, d, degree, causal):
    coeffs = [1.0, 1.0, 0.5] if degree == 2 else [1.0, 1.0, 0.5, 1 / 6, 1 / 24]
    mode = FakeTensorMode()
    q, k, v, _ = _fake_inputs(mode, d)
    with mode:
        out, state = OP(q, k, v, None, None, 0.1, coeffs, causal, 0)
        dq, dk, dv = BWD(out, q, k, v, out, state, None, None, 0.1, coeffs, causal, 0)
        switch = torch.ones((), dtype=torch.int8)
        sout, used, lse = SWITCHABLE(q, k, v, None, None, switch, 0.1, coeffs, causal, 0)
        sgrads = SWITCHABLE_BWD(sout, q, k, v, sout, None, None, used, lse, 0.1, coeffs, causal, 0)
    assert isinstance(out, FakeTensor) and out.shape == q.shape and out.dtype == q.dtype
    assert tuple(state.shape) == ((0,) if causal else (1, 2, fast_rank(d, degree), d))
    assert state.dtype == torch.float32
    assert [t.shape for t in (dq, dk, dv)] == [q.shape, k.shape, v.shape]
    assert sout.shape == q.shape and [t.shape for t in sgrads] == [q.shape, k.shape, v.shape]


@pytest.mark.parametrize("d", list(range(1, 70)) + [96, 128, 200])
def test_fast_rank_is_the_rank_of_the_built_layout(d):
    assert fast_rank(d, 2) == Quad2Features(d, (1.0, 1.0, 0.5), 0.3).rank
    assert fast_rank(d, 4) == features.feature_rank(d, 4)


@pytest.mark.parametrize("d,dv,hq,hk,alibi,degree", [
    (64, 64, 2, 2, False, 2), (20, 12, 4, 2, False, 2), (24, 8, 4, 2, True, 2), (5, 3, 2, 1, False, 4),
])
def test_fake_state_shape_matches_the_real_one(d, dv, hq, hk, alibi, degree):
    coeffs = [1.0, 1.0, 0.5] if degree == 2 else [1.0, 1.0, 0.5, 1 / 6, 1 / 24]
    q, k, v, _, slopes = make_inputs(1, hq, hk, 30, D=d, Dv=dv, alibi=alibi, requires_grad=False)
    real = OP(q, k, v, None, slopes, 0.1, coeffs, False, 0)[1]
    mode = FakeTensorMode()
    fq, fk, fv, fslopes = _fake_inputs(mode, d, dv, L=30, hq=hq, hk=hk, alibi=alibi)
    with mode:
        fake = OP(fq, fk, fv, None, fslopes, 0.1, coeffs, False, 0)[1]
    assert fake.shape == real.shape and fake.dtype == real.dtype


def _tensors(obj):
    found = [t for t in vars(obj).values() if isinstance(t, torch.Tensor)]
    found += [t for t in getattr(obj, "idx", []) if isinstance(t, torch.Tensor)]
    for tables in getattr(obj, "_maps", {}).values():
        found += list(tables)
    return found


@pytest.mark.parametrize("degree", [2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_kernels_traced_with_fake_tensors_leave_no_fake_tables_in_the_caches(degree, causal):
    """Running the torch path itself under a FakeTensorMode works, and the cached feature maps (and their per
    device/dtype tables) stay real: the next real call is unaffected."""
    d, coeffs = (16, (1.0, 1.0, 0.5)) if degree == 2 else (5, (1.0, 1.0, 0.5, 1 / 6, 1 / 24))
    scale = 0.321  # not used by other tests: the caches start empty for these keys
    q, k, v, _, _ = make_inputs(1, 2, 2, 150, D=d, Dv=4, requires_grad=False, std=0.5)
    mode = FakeTensorMode()
    with mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        out, _, state = cpu.forward(fq, fk, fv, scale=scale, coeffs=coeffs, causal=causal)
        cpu.backward(out, fq, fk, fv, out, scale=scale, coeffs=coeffs, causal=causal, state=state)
        fm_fake = fast_feature_map(d, degree, coeffs, scale, "cpu", torch.float32)
    assert isinstance(out, FakeTensor)
    fm = fast_feature_map(d, degree, coeffs, scale, "cpu", torch.float32)
    if degree > 2:
        assert fm is not fm_fake and fm is feature_map(d, degree, coeffs, scale, "cpu", torch.float32)
    assert not any(isinstance(t, FakeTensor) for t in _tensors(fm))
    real, _, _ = cpu.forward(q, k, v, scale=scale, coeffs=coeffs, causal=causal)
    assert not any(isinstance(t, FakeTensor) for t in _tensors(fm))
    ref = naive_poly_attention(q, k, v, scale=scale, causal=causal, degree=degree, coefficients=coeffs)
    torch.testing.assert_close(real, ref, atol=1e-5, rtol=1e-5)
