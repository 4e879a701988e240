"""decompose_mha: F.multi_head_attention_forward -> in-projection, SDPA, out-projection (same values)."""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.backends.debugging import aot_eager

from almostlinear.passes.match import find_sites
from almostlinear.passes.mha import MHA, NEED_WEIGHTS_REASON, decompose_mha
from almostlinear.passes.normalize import normalize
from almostlinear.rewriter.backend import hand_off, transform
from almostlinear.rewriter.options import Options

SDPA = F.scaled_dot_product_attention
E, H, B, L, S = 16, 4, 2, 5, 7


class Capture:
    """A backend that applies decompose_mha, keeps the graph and the results, and runs the rewritten graph."""

    def __init__(self, inner: str = "eager", match: bool = False):
        self.inner, self.match = inner, match
        self.graphs: list[fx.GraphModule] = []
        self.results: list[list[tuple[fx.Node, str]]] = []
        self.sites: list = []

    def __call__(self, gm: fx.GraphModule, example_inputs):
        before = set(gm.graph.nodes)
        self.results.append(decompose_mha(gm))
        self.graphs.append(gm)
        self.new_nodes = [n for n in gm.graph.nodes if n not in before]
        if self.match:  # what the backend's matcher sees afterwards (on a copy: normalize rewrites in place)
            work = fx.GraphModule(gm, copy.deepcopy(gm.graph))
            normalize(work)
            self.sites.extend(find_sites(work, example_inputs)[0])
        if self.inner == "aot_eager":
            return aot_eager(gm, example_inputs)
        return gm.forward

    @property
    def all_results(self) -> list[tuple[fx.Node, str]]:
        return [r for rs in self.results for r in rs]


def targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def run(fn, module: nn.Module, inputs, seed: int = 0):
    """Outputs, and gradients of every parameter and floating input for a random cotangent."""
    def prepare(x):  # floating inputs are differentiated, except masks holding -inf
        if not isinstance(x, torch.Tensor):
            return x
        grad = x.is_floating_point() and bool(x.isfinite().all())
        return x.detach().clone().requires_grad_(grad)

    args = [prepare(x) for x in inputs]
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    outs = [o for o in _flat(fn(*args)) if o.is_floating_point()]
    torch.manual_seed(1234)
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)
    loss.backward()
    grads = [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads += [p.grad for p in module.parameters()]
    return [o.detach() for o in outs], grads


def check_same(fn, module, inputs, backend, dynamic=False, fullgraph=True):
    ref_out, ref_grads = run(fn, module, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    out, grads = run(compiled, module, inputs)
    assert len(out) == len(ref_out) and len(grads) == len(ref_grads)
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, equal_nan=True)
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def assert_decomposed(backend: Capture, count: int = 1):
    results = backend.results[-1]  # the last graph compiled
    assert len(results) == count, results
    assert all(text.startswith("decomposed") for _, text in results), results
    gm = backend.graphs[-1]
    assert MHA not in targets(gm)
    assert targets(gm).count(SDPA) == count
    assert backend.new_nodes
    source = results[0][0].meta  # the erased call keeps its meta
    for node in backend.new_nodes:
        assert "example_value" in node.meta and "val" in node.meta, node.format_node()
        assert node.meta["val"] is node.meta["example_value"]
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if count == 1:
                assert node.meta.get(key) == source.get(key), (key, node.format_node())
            else:
                assert key in node.meta or key not in source


def sdpa_node(gm: fx.GraphModule) -> fx.Node:
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]
    return node


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------


def padding(kind: str | None, batch: int = B, length: int = S):
    if kind is None:
        return None
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[0, length - 2 :] = True
    pad[-1, length - 1] = True
    return pad if kind == "bool" else torch.zeros(batch, length).masked_fill(pad, float("-inf"))


def attn_mask(kind: str | None, tgt: int, src: int):
    if kind is None:
        return None
    if kind == "causal":  # float 0 / -inf (generate_square_subsequent_mask), square only
        return nn.Transformer.generate_square_subsequent_mask(tgt)
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(tgt, src, generator=gen) > 0.6
    mask[:, 0] = False  # every query keeps a key
    return mask


# ---------------------------------------------------------------------------------------------------
# nn.MultiheadAttention, need_weights=False: decomposed, same outputs and gradients
# ---------------------------------------------------------------------------------------------------

MASK_CASES = [  # (key_padding_mask, attn_mask) with matching dtypes (mixed dtypes warn: a graph break)
    (None, None),
    ("bool", None),
    ("float", None),
    (None, "causal"),
    (None, "bool"),
    ("float", "causal"),
    ("bool", "bool"),
]


# a square causal mask needs equal lengths: no causal case for cross-attention
ATTENTION_CASES = [(cross, kpm, am) for cross in (False, True) for kpm, am in MASK_CASES if not (cross and am == "causal")]


@pytest.mark.parametrize("cross,kpm,am", ATTENTION_CASES,
                         ids=[f"{'cross' if c else 'self'}-kpm={k}-mask={m}" for c, k, m in ATTENTION_CASES])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_mha_matches_eager(batch_first, cross, kpm, am):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
    src = S if cross else L
    x = torch.randn(B, L, E) if batch_first else torch.randn(L, B, E)
    y = torch.randn(B, src, E) if batch_first else torch.randn(src, B, E)
    masks = (padding(kpm, length=src), attn_mask(am, L, src))

    if cross:

        def fn(x, y, kpm, am):
            return mha(x, y, y, key_padding_mask=kpm, attn_mask=am, need_weights=False)[0]

        inputs = (x, y, *masks)
    else:

        def fn(x, kpm, am):
            return mha(x, x, x, key_padding_mask=kpm, attn_mask=am, need_weights=False)[0]

        inputs = (x, *masks)
    backend = Capture()
    check_same(fn, mha, inputs, backend)
    assert_decomposed(backend)
    sdpa = sdpa_node(backend.graphs[-1])
    mask = sdpa.kwargs["attn_mask"]
    assert (mask is None) == (kpm is None and am is None)
    if kpm is not None:  # the key padding part is [B, 1, 1, S]: it visibly broadcasts over the queries
        key_part = mask if am is None else mask.args[1]
        assert tuple(key_part.meta["example_value"].shape) == (B, 1, 1, src)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_mha_eval_mode_and_training_with_zero_dropout(inner):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dropout=0.0, batch_first=True)
    x, kpm = torch.randn(B, L, E), padding("bool", length=L)

    def fn(x, kpm):
        return mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]

    for train in (True, False):
        mha.train(train)
        backend = Capture(inner)
        check_same(fn, mha, (x, kpm), backend)
        assert_decomposed(backend)
        assert sdpa_node(backend.graphs[-1]).kwargs["dropout_p"] == 0.0


def test_eval_mode_zeroes_dropout():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dropout=0.3, batch_first=True).eval()
    x = torch.randn(B, L, E)

    def fn(x):
        return mha(x, x, x, need_weights=False)[0]

    backend = Capture()
    check_same(fn, mha, (x,), backend)
    assert_decomposed(backend)
    assert sdpa_node(backend.graphs[-1]).kwargs["dropout_p"] == 0.0


def test_training_dropout_is_passed_to_sdpa():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dropout=0.25, batch_first=True).train()
    backend = Capture()
    torch.compile(lambda x: mha(x, x, x, need_weights=False)[0], backend=backend, fullgraph=True)(torch.randn(B, L, E))
    assert_decomposed(backend)
    assert sdpa_node(backend.graphs[-1]).kwargs["dropout_p"] == 0.25


@pytest.mark.parametrize("bias", [True, False])
def test_kdim_vdim_use_separate_projection_weights(bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, kdim=12, vdim=10, bias=bias, batch_first=True)
    x, k, v = torch.randn(B, L, E), torch.randn(B, S, 12), torch.randn(B, S, 10)
    kpm = padding("bool", length=S)

    def fn(x, k, v, kpm):
        return mha(x, k, v, key_padding_mask=kpm, need_weights=False)[0]

    backend = Capture()
    check_same(fn, mha, (x, k, v, kpm), backend)
    assert_decomposed(backend)
    assert "separate in-projection" in backend.all_results[0][1]


def test_distinct_key_and_value_tensors_packed_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H)
    x, k, v = torch.randn(L, B, E), torch.randn(S, B, E), torch.randn(S, B, E)

    def fn(x, k, v):
        return mha(x, k, v, need_weights=False)[0]

    backend = Capture()
    check_same(fn, mha, (x, k, v), backend)
    assert_decomposed(backend)


def test_unbatched_input():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H)
    x, kpm, am = torch.randn(L, E), padding("bool", batch=1, length=L)[0], attn_mask("bool", L, L)

    def fn(x, kpm, am):
        return mha(x, x, x, key_padding_mask=kpm, attn_mask=am, need_weights=False)[0]

    backend = Capture()
    check_same(fn, mha, (x, kpm, am), backend)
    assert_decomposed(backend)


def test_three_d_attn_mask_per_batch_and_head():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(B, L, E)
    am = torch.randn(B * H, L, L)

    def fn(x, am):
        return mha(x, x, x, attn_mask=am, need_weights=False)[0]

    backend = Capture()
    check_same(fn, mha, (x, am), backend)
    assert_decomposed(backend)


def test_is_causal_hint_becomes_sdpa_is_causal():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    x, causal = torch.randn(B, L, E), attn_mask("causal", L, L)

    def fn(x, am):
        return mha(x, x, x, attn_mask=am, is_causal=True, need_weights=False)[0]

    backend = Capture()
    check_same(fn, mha, (x, causal), backend)
    assert_decomposed(backend)
    sdpa = sdpa_node(backend.graphs[-1])
    assert sdpa.kwargs["is_causal"] is True and sdpa.kwargs["attn_mask"] is None


def test_is_causal_hint_with_key_padding_uses_the_merged_mask():
    """multi_head_attention_forward drops the hint when a key padding mask is given."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    x, causal, kpm = torch.randn(B, L, E), attn_mask("causal", L, L), padding("float", length=L)

    def fn(x, am, kpm):
        return mha(x, x, x, attn_mask=am, key_padding_mask=kpm, is_causal=True, need_weights=False)[0]

    backend = Capture()
    check_same(fn, mha, (x, causal, kpm), backend)
    assert_decomposed(backend)
    sdpa = sdpa_node(backend.graphs[-1])
    assert sdpa.kwargs["is_causal"] is False and sdpa.kwargs["attn_mask"] is not None


def test_direct_functional_call_with_bool_masks_and_kwargs():
    """F.multi_head_attention_forward called directly: bool masks are canonicalised by the pass."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H)
    x, kpm, am = torch.randn(L, B, E), padding("bool", length=L), attn_mask("bool", L, L)

    def fn(x, kpm, am):
        out, weights = F.multi_head_attention_forward(
            x, x, x, E, H, mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.0,
            mha.out_proj.weight, mha.out_proj.bias, training=True, key_padding_mask=kpm,
            need_weights=False, attn_mask=am,
        )
        return out if weights is None else out + 1

    backend = Capture()
    check_same(fn, mha, (x, kpm, am), backend)
    assert_decomposed(backend)


# ---------------------------------------------------------------------------------------------------
# Left untouched, with the reason
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cross", [False, True])
def test_need_weights_true_is_left_untouched(cross):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    x, y = torch.randn(B, L, E), torch.randn(B, S, E)
    kpm = padding("bool", length=S if cross else L)

    def fn(x, y, kpm):
        k = y if cross else x
        out, weights = mha(x, k, k, key_padding_mask=kpm, need_weights=True)
        return out, weights

    backend = Capture()
    check_same(fn, mha, (x, y, kpm), backend)
    assert [text for _, text in backend.all_results] == [NEED_WEIGHTS_REASON]
    gm = backend.graphs[-1]
    assert MHA in targets(gm) and SDPA not in targets(gm)


@pytest.mark.parametrize(
    "kwargs,reason",
    [({"add_bias_kv": True}, "bias_k/bias_v"), ({"add_zero_attn": True}, "add_zero_attn")],
)
def test_bias_kv_and_zero_attn_are_left_untouched(kwargs, reason):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, **kwargs)
    x = torch.randn(B, L, E)

    def fn(x):
        return mha(x, x, x, need_weights=False)[0]

    backend = Capture()
    check_same(fn, mha, (x,), backend)
    ((node, text),) = backend.all_results
    assert reason in text and not text.startswith("decomposed")
    assert MHA in targets(backend.graphs[-1])


# ---------------------------------------------------------------------------------------------------
# nn.TransformerEncoderLayer / DecoderLayer, dynamic shapes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval_with_grad"])
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "causal+padding"])
def test_transformer_encoder_layer(train, masks):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True).train(train)
    x = torch.randn(B, L, E)
    kpm = padding("float", length=L) if "padding" in masks else None  # float: same dtype as the causal mask
    causal = attn_mask("causal", L, L) if "causal" in masks else None

    def fn(x, kpm, causal):
        return layer(x, src_mask=causal, src_key_padding_mask=kpm, is_causal=causal is not None)

    backend = Capture()
    check_same(fn, layer, (x, kpm, causal), backend)
    assert_decomposed(backend)


def test_transformer_decoder_layer_self_and_cross_attention():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    tgt, memory = torch.randn(B, L, E), torch.randn(B, S, E)
    causal, mem_kpm = attn_mask("causal", L, L), padding("float", length=S)

    def fn(tgt, memory, causal, mem_kpm):
        return layer(tgt, memory, tgt_mask=causal, memory_key_padding_mask=mem_kpm, tgt_is_causal=True)

    backend = Capture()
    check_same(fn, layer, (tgt, memory, causal, mem_kpm), backend)
    assert_decomposed(backend, count=2)


def test_encoder_layer_fast_path_is_not_an_mha_call():
    """eval + no_grad: the layer runs torch._transformer_encoder_layer_fwd, which this pass does not open."""
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    backend = Capture()
    with torch.no_grad():
        torch.compile(layer, backend=backend)(torch.randn(B, L, E))
    assert backend.all_results == []


def test_dynamic_shapes():
    """One graph with symbolic lengths serves two input sizes, with the same values and gradients as eager."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)

    def fn(x, y, kpm):
        return mha(x, y, y, key_padding_mask=kpm, need_weights=False)[0]

    backend = Capture("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, dynamic=True, fullgraph=True)
    compiled_graphs = []
    for length, src in ((L, S), (L + 2, S + 3)):
        inputs = (torch.randn(B, length, E), torch.randn(B, src, E), padding("bool", length=src))
        ref_out, ref_grads = run(fn, mha, inputs)
        out, grads = run(compiled, mha, inputs)
        for a, b in zip(out + grads, ref_out + ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        compiled_graphs.append(len(backend.graphs))
    assert compiled_graphs[0] == compiled_graphs[1]  # no recompilation for the new lengths
    assert_decomposed(backend)
    shape = sdpa_node(backend.graphs[-1]).meta["val"].shape
    assert any(isinstance(d, torch.SymInt) for d in shape)


def test_getitem_one_is_replaced_by_none():
    """A graph that reads the weights (None for need_weights=False) keeps working after the pass."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H)
    x = torch.randn(L, B, E)
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    graph = gm.graph
    xs, w, b, ow, ob = (graph.placeholder(n) for n in ("x", "w", "b", "ow", "ob"))
    call = graph.call_function(
        MHA, (xs, xs, xs, E, H, w, b, None, None, False, 0.0, ow, ob), {"need_weights": False}
    )
    out, weights = graph.call_function(operator.getitem, (call, 0)), graph.call_function(operator.getitem, (call, 1))
    graph.output((out, weights))
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode()
    real = (x, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias)
    for node, value in zip((xs, w, b, ow, ob), real):
        node.meta["example_value"] = fake_mode.from_tensor(value)
    with fake_mode:
        call.meta["example_value"] = MHA(*[n.meta["example_value"] for n in (xs, xs, xs)], E, H,
                                         w.meta["example_value"], b.meta["example_value"], None, None, False, 0.0,
                                         ow.meta["example_value"], ob.meta["example_value"], need_weights=False)
    gm.recompile()
    ((_, text),) = decompose_mha(gm)
    assert text.startswith("decomposed")
    got, got_weights = gm(*real)
    expected, _ = mha(x, x, x, need_weights=False)
    assert got_weights is None
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# What the matcher finds afterwards, and the exact rewrite end to end
# ---------------------------------------------------------------------------------------------------


def _site_kind(fn, inputs, module) -> str:
    backend = Capture(match=True)
    check_same(fn, module, inputs, backend)
    assert_decomposed(backend)
    (site,) = backend.sites
    assert site.form == "sdpa"
    return site.mask.kind


def test_matcher_sees_mask_kinds():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    mha = layer.self_attn
    x, kpm = torch.randn(B, L, E), padding("float", length=L)

    assert _site_kind(lambda x: mha(x, x, x, need_weights=False)[0], (x,), mha) == "none"
    assert _site_kind(lambda x, k: mha(x, x, x, key_padding_mask=k, need_weights=False)[0], (x, kpm), mha) == (
        "key_padding"
    )

    def causal_layer(x):  # the encoder layer passes the hint on: SDPA is_causal=True
        return layer(x, src_mask=nn.Transformer.generate_square_subsequent_mask(x.shape[1]), is_causal=True)

    assert _site_kind(causal_layer, (x,), layer) == "causal"

    def bool_causal_in_graph(x):  # a bool mask built in the graph, canonicalised to 0/-inf, then proved causal
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        return mha(x, x, x, attn_mask=mask, need_weights=False)[0]

    assert _site_kind(bool_causal_in_graph, (x,), mha) == "causal"


def test_matcher_sees_causal_plus_key_padding():
    """The merged mask is add(static causal [1, 1, L, S], data key padding [B, 1, 1, S]): the matcher splits it."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    x, kpm = torch.randn(B, L, E), padding("float", length=L)

    def fn(x, kpm):
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return layer(x, src_mask=causal, src_key_padding_mask=kpm, is_causal=True)

    assert _site_kind(fn, (x, kpm), layer) == "causal+key_padding"


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_backend_transform_rewrites_the_decomposed_site_exactly(inner):
    """decompose_mha before the backend's transform: the site is found and rewritten; values unchanged."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    x, kpm = torch.randn(B, L, E), padding("float", length=L)
    reports = []

    def backend(gm, example_inputs):
        decompose_mha(gm)
        report, work = transform(gm, example_inputs, Options.from_mapping({"method": "exact", "inner": inner}))
        reports.append(report)
        return hand_off(work, example_inputs, inner)

    def fn(x, kpm):
        return layer(x, src_key_padding_mask=kpm)

    check_same(fn, layer, (x, kpm), backend)
    (site,) = reports[-1].sites
    assert site.form == "sdpa" and site.mask_kind == "key_padding" and site.method == "exact", str(reports[-1])
