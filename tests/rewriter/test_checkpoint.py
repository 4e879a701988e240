"""Attention inside torch.utils.checkpoint: Dynamo captures the region as
torch.ops.higher_order.tag_activation_checkpoint(wrap_body_N, *args) with the body a submodule. The site is
matched and rewritten inside the body (the checkpoint stays), kept exact, and reported with its region."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import almostlinear
from almostlinear.passes.subgraphs import find_regions
from almostlinear.passes.subgraphs import copy_with_node_map
from tests.oracle import assert_exact_oracle

T, C, H = 8, 16, 2


class Attention(nn.Module):
    """Causal (or not) self-attention, as one SDPA call or an eager matmul-softmax chain with a causal buffer."""

    def __init__(self, form: str, causal: bool):
        super().__init__()
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.form, self.causal = form, causal
        self.register_buffer("bias", torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32))

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = (t.view(B, L, H, C // H).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        if self.form == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / (C // H) ** 0.5)
            if self.causal:
                att = att.masked_fill(self.bias[:, :, :L, :L] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        return x + self.proj(y.transpose(1, 2).reshape(B, L, C))


class Checkpointed(nn.Module):
    def __init__(self, form="eager", causal=True, reentrant=False, pre=None):
        super().__init__()
        self.pre = pre if pre is not None else nn.LayerNorm(C)
        self.attn = Attention(form, causal)
        self.reentrant = reentrant

    def forward(self, x):
        return checkpoint(self.attn, self.pre(x), use_reentrant=self.reentrant).sum(-1)


class Nested(nn.Module):
    """checkpoint(a -> checkpoint(b)): the inner body is a submodule of the outer body."""

    def __init__(self, reentrant=False):
        super().__init__()
        self.a, self.b = Attention("eager", True), Attention("sdpa", True)
        self.reentrant = reentrant

    def inner(self, x):
        return checkpoint(self.b, self.a(x), use_reentrant=self.reentrant)

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=self.reentrant) * 2


def _x():
    return torch.randn(2, T, C)


def _body_codes(report):
    return report.graph_after.split("# wrap_body_")[1:]


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("form", ["eager", "sdpa"])
@pytest.mark.parametrize("causal", [True, False])
def test_checkpointed_site_is_rewritten_in_its_body_and_gradients_match_eager(reentrant, form, causal):
    torch.manual_seed(0)
    model = Checkpointed(form, causal, reentrant)
    report = assert_exact_oracle(model, (_x(),), inner="eager", expect_sites=1)
    site = report.sites[0]
    assert site.module_path == "attn"
    assert site.region == f"checkpoint wrap_body_0, use_reentrant={reentrant}"
    assert site.method == "exact" and "inside a checkpointed region" in site.reason
    assert site.mask_kind == ("causal" if causal else "none")
    # the checkpoint stays in the parent graph; the body now holds one SDPA call and no softmax
    parent, body = report.graph_after.split("# wrap_body_0")
    assert "tag_activation_checkpoint" in parent and "softmax" not in parent
    assert "scaled_dot_product_attention" in body and "softmax" not in body
    assert ("is_causal = True" in body) == causal
    assert "masked_fill" not in body
    assert report.near_misses == []


@pytest.mark.parametrize("reentrant", [False, True])
def test_aot_eager_through_the_rewritten_body(reentrant):
    torch.manual_seed(0)
    assert_exact_oracle(Checkpointed("eager", True, reentrant), (_x(),), inner="aot_eager", expect_sites=1)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # eager reentrant, inner call
@pytest.mark.parametrize("reentrant", [False, True])
def test_nested_checkpoints(reentrant):
    torch.manual_seed(0)
    report = assert_exact_oracle(Nested(reentrant), (_x(),), inner="eager", expect_sites=2)
    by_path = {s.module_path: s for s in report.sites}
    assert by_path["a"].region == f"checkpoint wrap_body_1, use_reentrant={reentrant}"
    assert by_path["b"].region == (f"checkpoint wrap_body_1, use_reentrant={reentrant} > "
                                   f"checkpoint wrap_body_0, use_reentrant={reentrant}")
    assert by_path["a"].mask_kind == "causal" and by_path["b"].mask_kind == "causal"
    assert "softmax" not in report.graph_after
    assert report.graph_after.count("tag_activation_checkpoint(") == 2


def test_auto_keeps_checkpointed_sites_exact_and_says_why():
    torch.manual_seed(0)
    backend = almostlinear.Backend(min_seq_len=0, inner="eager")
    model = Checkpointed("eager", True)
    x = _x()
    torch.compile(model, backend=backend)(x).sum().backward()
    report = backend.reports[-1]
    (site,) = report.sites
    assert site.method == "exact" and site.rewritten
    assert site.reason.startswith("fused exact: inside a checkpointed region (checkpoint wrap_body_0")
    assert "polynomial" in site.reason  # what it would have been
    assert report.grad_error is None and "[checkpoint wrap_body_0" in str(report)


def test_captured_graph_module_is_not_mutated():
    torch.manual_seed(0)
    backend = almostlinear.Backend(method="exact", inner="eager")
    backend.keep_graph_modules = True
    torch.compile(Nested(), backend=backend)(_x())
    report = backend.reports[-1]
    before, after = report._graph_module_before, report._graph_module_after
    assert before.wrap_body_1 is not after.wrap_body_1
    assert before.wrap_body_1.wrap_body_0 is not after.wrap_body_1.wrap_body_0
    assert "softmax" in before.wrap_body_1.code
    assert "scaled_dot_product_attention" in before.wrap_body_1.wrap_body_0.code
    assert "softmax" in report.graph_before and "softmax" not in after.wrap_body_1.code


def test_region_inputs_leave_batchnorm_statistics_and_rng_as_eager():
    """The region's inputs are computed on copies and the RNG state is restored: batch norm running stats
    move once per call and dropout before the checkpoint draws the same mask as eager."""
    def pre():
        return nn.Sequential(nn.Dropout(0.5), nn.Flatten(0, 1), nn.BatchNorm1d(C), nn.Unflatten(0, (2, T)))

    torch.manual_seed(0)
    model = Checkpointed("eager", True, pre=pre()).train()
    eager = Checkpointed("eager", True, pre=pre()).train()
    eager.load_state_dict(model.state_dict())
    x = _x()
    torch.manual_seed(1)
    expected = eager(x)
    torch.manual_seed(1)
    got = torch.compile(model, backend=almostlinear.Backend(method="exact", inner="eager"))(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model.pre[2].running_mean, eager.pre[2].running_mean)


def test_unknown_region_inputs_keep_masks_unproved_and_exact():
    """Without real values for the body's inputs (fake example inputs), a buffer mask is not evaluated."""
    torch.manual_seed(0)
    captured = []

    def grab(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    torch.compile(Checkpointed("eager", True), backend=grab)(_x())
    work, _ = copy_with_node_map(captured[0])
    (region,) = find_regions(work, None)
    assert region.values_note == "the example inputs are fake"
    (site,) = region.sites
    assert site.mask.kind == "dense"
    assert captured[0].wrap_body_0 is not work.wrap_body_0  # the body was copied, not normalized in place


def test_attention_in_another_higher_order_op_is_a_near_miss():
    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v

    def f(q, k, v):
        return torch.cond(q.sum() > 0, attend, lambda q, k, v: attend(q * 2, k, v), (q, k, v))

    backend = almostlinear.Backend(inner="eager")
    q = torch.randn(1, 2, 8, 4)
    torch.testing.assert_close(torch.compile(f, backend=backend)(q, q, q), f(q, q, q))
    report = backend.reports[-1]
    assert report.sites == []
    assert len(report.near_misses) == 2
    for miss in report.near_misses:
        assert "inside a `cond` region" in miss.reason and "only torch.utils.checkpoint bodies" in miss.reason


class _CountAttentionOps(TorchDispatchMode):
    """Counts the aten ops that compute attention weights (SDPA's kernels or its math path's softmax)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "backward" not in name and ("_softmax." in name or "scaled_dot_product" in name):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_rewritten_body_is_still_recomputed_in_the_backward():
    torch.manual_seed(0)
    compiled = torch.compile(Checkpointed("eager", True), backend=almostlinear.Backend(method="exact", inner="eager"))
    x = _x().requires_grad_(True)
    compiled(x)  # compiles
    with _CountAttentionOps() as forward_only:
        compiled(x)
    with _CountAttentionOps() as forward_backward:
        compiled(x).sum().backward()
    assert forward_only.calls >= 1
    assert forward_backward.calls == 2 * forward_only.calls  # the region is recomputed in the backward


class Mixed(nn.Module):
    """A top-level attention (approximable) before a checkpointed one (kept exact)."""

    def __init__(self):
        super().__init__()
        self.top, self.ckpt = Attention("sdpa", False), Attention("eager", True)

    def forward(self, x):
        return checkpoint(self.ckpt, self.top(x), use_reentrant=False)


def test_polynomial_top_level_site_with_a_checkpointed_exact_site():
    torch.manual_seed(0)
    backend = almostlinear.Backend(method="polynomial", min_seq_len=0, inner="eager", budget=10.0)
    model = Mixed()
    x = _x().requires_grad_(True)
    torch.compile(model, backend=backend)(x).sum().backward()
    report = backend.reports[-1]
    by_path = {s.module_path: s for s in report.sites}
    assert by_path["top"].method == "polynomial" and by_path["top"].region == ""
    assert by_path["ckpt"].method == "exact" and "inside a checkpointed region" in by_path["ckpt"].reason
    assert report.grad_error is not None
    assert all(p.grad is not None for p in model.parameters())


class MaskPassedIn(nn.Module):
    """The additive mask is built outside the checkpoint and passed in: from a buffer (static), or from a
    user input held in a variable whose name looks like a buffer's."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.register_buffer("bias", torch.tril(torch.ones(32, 32)))

    def body(self, x, mask):
        B, L, _ = x.shape
        q, k, v = (t.view(B, L, H, C // H).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / (C // H) ** 0.5) + mask
        return (F.softmax(att, dim=-1) @ v).sum(-1)

    def forward(self, x, user_mask=None):
        L = x.shape[1]
        if user_mask is None:
            static_mask = torch.zeros(L, L).masked_fill(self.bias[:L, :L] == 0, float("-inf"))
            return checkpoint(self.body, x, static_mask, use_reentrant=False)
        buffers_mask = user_mask * 1.0
        return checkpoint(self.body, x, buffers_mask, use_reentrant=False)


def _causal_additive():
    return torch.zeros(T, T).masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf"))


def test_static_mask_built_outside_the_checkpoint_is_proved_causal():
    torch.manual_seed(0)
    report = assert_exact_oracle(MaskPassedIn(), (_x(),), inner="eager", expect_sites=1)
    (site,) = report.sites
    assert site.mask_kind == "causal", str(report)
    assert "is_causal = True" in report.graph_after.split("# wrap_body_0")[1]


def test_data_mask_passed_into_the_checkpoint_is_not_taken_for_a_buffer():
    """The body's placeholder is named after the user's variable `buffers_mask`; its kind comes from the
    parent graph (it depends on an input), so its example value (causal here) is not baked in."""
    torch.manual_seed(0)
    model = MaskPassedIn()
    backend = almostlinear.Backend(method="exact", inner="eager")
    compiled = torch.compile(model, backend=backend)
    x = _x()
    torch.testing.assert_close(compiled(x, _causal_additive()), model(x, _causal_additive()))
    (site,) = backend.reports[-1].sites
    assert site.mask_kind == "dense" and "is_causal = True" not in backend.reports[-1].graph_after
    other = torch.zeros(T, T).masked_fill(torch.rand(T, T) < 0.3, float("-inf")).fill_diagonal_(0.0)
    torch.testing.assert_close(compiled(x, other), model(x, other))


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gpt2_with_gradient_checkpointing(reentrant):
    """HF builds the causal mask outside the decoder layers and passes it into each checkpointed layer."""
    pytest.importorskip("transformers")
    from almostlinear.zoo import build
    from tests.models.test_hf import _Wrapped

    torch.manual_seed(0)
    model, ids, kwargs = build("gpt2", "eager")
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    report = assert_exact_oracle(_Wrapped(model, kwargs), (ids,), inner="eager", expect_sites=2)
    for site in report.sites:
        assert site.region.startswith("checkpoint wrap_body_") and site.mask_kind == "causal", str(report)
        assert site.rewritten and "is_causal=True" in site.reason
    assert "softmax" not in report.graph_after
