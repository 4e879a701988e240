"""Property tests: random attention programs built from spelling components, and random look-alikes.

Each program is generated as Python source (so every example is a new function to Dynamo) from:
matmul form x key transpose x scale form/placement x mask kind/spelling x softmax spelling x casts x
dropout x layout (scores and/or weights over merged [B*H, L, S], bmm/baddbmm, views back and forth) x
dead introspection copies of the scores or weights x a score transform (soft-cap, clamp). Attention must be
found with the right scale, mask kind and causal flag and equal eager in exact mode; a transformed site is
kept as written (and still found, with its mask). Look-alikes (softmax over another dim, no softmax, wrong
transpose, escaping or stored weights, a copy mutated in place, reshapes across the key axis) must never be
rewritten, and every softmax left as written is explained.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import almostlinear

B, H, L, D = 2, 2, 6, 4  # B == H on purpose: a wrong permute of batch/head dims still type-checks

SCORES = {
    "at": "q @ {kt}",
    "matmul": "torch.matmul(q, {kt})",
    "method": "q.matmul({kt})",
    "einsum": "torch.einsum('bhqd,bhkd->bhqk', q, k)",
}
KEY_T = {"t": "k.transpose(-2, -1)", "t23": "k.transpose(2, 3)", "mT": "k.mT", "perm": "k.permute(0, 1, 3, 2)"}
SOFTMAX = {
    "F": "F.softmax(s, dim={dim})",
    "torch": "torch.softmax(s, {dim})",
    "method": "s.softmax(dim={dim})",
}
MASKS = {  # name -> (lines applied to `s`, expected kind)
    "none": ([], "none"),
    "fill_causal": (["s = s.masked_fill(~torch.tril(torch.ones(L, L, dtype=torch.bool)), float('-inf'))"], "causal"),
    "fill_eq0": (["s = s.masked_fill(torch.tril(torch.ones(L, L)) == 0, float('-inf'))"], "causal"),
    "where_causal": (["s = torch.where(torch.tril(torch.ones(L, L, dtype=torch.bool)), s, torch.finfo(s.dtype).min)"], "causal"),
    "arange_causal": (["i = torch.arange(L)", "s = s.masked_fill(i[None, :] > i[:, None], float('-inf'))"], "causal"),
    "additive_first": (["s = bias + s"], "dense"),
    "additive_last": (["s = s + bias"], "dense"),
    "key_pad": (["s = s.masked_fill(~keep[:, None, None, :], float('-inf'))"], "key_padding"),
    "window": (["i = torch.arange(L)", "s = s.masked_fill((i[None, :] > i[:, None]) | (i[None, :] <= i[:, None] - 2), float('-inf'))"], "causal+window"),
}


SCORES_3D = {  # scores over merged [B*H, L, S] (BLOOM, GPT-2 era code), viewed to [B, H, L, S] for the mask
    "bmm": "torch.bmm(q3, k3.transpose(1, 2))",
    "at_mT": "q3 @ k3.mT",
    "baddbmm_zero_bias": "torch.baddbmm(torch.zeros(1, 1, L), q3, k3.transpose(-2, -1))",
    "baddbmm_beta0": "torch.zeros(B * H, L, L).baddbmm(q3, k3.transpose(-2, -1), beta=0.0, alpha=1.0)",
}
DEAD = {  # name -> (where, lines): introspection copies nothing reads
    "none": ("", []),
    "scores_clone": ("scores", ["dbg = s.clone()"]),
    "scores_amax": ("masked", ["max_logit = s.amax(-1)"]),
    "weights_detach": ("weights", ["probs_for_vis = w.detach()"]),
    "weights_float_cpu": ("weights", ["logged = w.float().cpu()"]),
    "weights_stats": ("weights", ["with torch.no_grad():", "    ent = -(w * w.clamp_min(1e-9).log()).sum(-1)"]),
}
TRANSFORMS = {  # name -> (line, reason prefix); applied after the scale, before the mask
    "none": ("", ""),
    "tanh": ("s = torch.tanh(s / 5.0) * 5.0", "kept as written: soft-capped scores (tanh(s / 5) * 5)"),
    "tanh_method": ("s = s.div(4.0).tanh().mul(4.0)", "kept as written: soft-capped scores (tanh(s / 4) * 4)"),
    "clamp": ("s = s.clamp(-3.0, 3.0)", "kept as written: clamped scores (clamp(s, -3, 3))"),
}


@st.composite
def attention_programs(draw):
    scores = draw(st.sampled_from(sorted(SCORES)))
    kt = draw(st.sampled_from(sorted(KEY_T)))
    scale_form = draw(st.sampled_from(["mul", "div", "pre_q", "pre_qk", "none"]))
    mask = draw(st.sampled_from(sorted(MASKS)))
    softmax = draw(st.sampled_from(sorted(SOFTMAX)))
    dim = draw(st.sampled_from(["-1", "3"]))
    upcast = draw(st.booleans())
    dropout = draw(st.booleans())
    scores_3d = draw(st.sampled_from(["", "", *sorted(SCORES_3D)]))  # half the programs keep 4-D scores
    weights_3d = draw(st.booleans())
    dead = draw(st.sampled_from(sorted(DEAD)))
    transform = draw(st.sampled_from(["none", "none", "none", *sorted(TRANSFORMS)]))
    dead_where, dead_lines = DEAD[dead]
    lines = ["def program(q, k, v, bias, keep):"]
    scale = 1.0
    if scale_form == "pre_q":
        lines.append("    q = q * 0.5")
        scale = 0.5
    elif scale_form == "pre_qk":
        lines.append("    q = q * 0.5")
        lines.append("    k = k * 0.25")
        scale = 0.125
    if scores_3d:
        lines.append("    q3, k3 = q.reshape(B * H, L, D), k.reshape(B * H, L, D)")
        lines.append("    s = " + SCORES_3D[scores_3d])
    else:
        lines.append("    s = " + SCORES[scores].format(kt=KEY_T[kt]))
    if scale_form == "mul":
        lines.append("    s = s * (1.0 / math.sqrt(q.size(-1)))")
        scale = 0.5
    elif scale_form == "div":
        lines.append("    s = s / math.sqrt(q.size(-1))")
        scale = 0.5
    if dead_where == "scores":
        lines += ["    " + m for m in dead_lines]
    if TRANSFORMS[transform][0]:
        lines.append("    " + TRANSFORMS[transform][0])
    if scores_3d:
        lines.append("    s = s.view(B, H, L, L)")
    mask_lines, kind = MASKS[mask]
    lines += ["    " + m for m in mask_lines]
    if dead_where == "masked":
        lines += ["    " + m for m in dead_lines]
    if upcast:
        lines.append("    s = s.float()")
    lines.append("    w = " + SOFTMAX[softmax].format(dim=dim))
    if upcast:
        lines.append("    w = w.to(q.dtype)")
    if dead_where == "weights":
        lines += ["    " + m for m in dead_lines]
    if dropout:
        lines.append("    w = F.dropout(w, p=0.0, training=True)")
    if weights_3d:
        lines.append("    return torch.bmm(w.reshape(B * H, L, L), v.reshape(B * H, L, D)).view(B, H, L, D)")
    else:
        lines.append("    return w @ v")
    return "\n".join(lines), kind, scale, TRANSFORMS[transform][1]


LOOKALIKES = {
    "softmax_other_dim": "    return (q @ k.transpose(-2, -1)).softmax(dim=2) @ v",
    "log_softmax": "    return F.log_softmax(q @ k.transpose(-2, -1), dim=-1) @ v",
    "no_softmax": "    return (q @ k.transpose(-2, -1) * 0.5) @ v",
    "wrong_transpose": "    return (q @ k.permute(1, 0, 3, 2)).softmax(-1) @ v",  # B == H: shapes fit, dims do not
    "wrong_permute": "    return (q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1)).softmax(-1) @ v.permute(0, 2, 1, 3)",
    "weights_escape": "    w = (q @ k.transpose(-2, -1)).softmax(-1)\n    return w @ v, w",
    "scores_escape": "    s = q @ k.transpose(-2, -1)\n    return s.softmax(-1) @ v, s",
    "tanh_capping": "    s = torch.tanh(q @ k.transpose(-2, -1) / 8.0) * 8.0\n    return s.softmax(-1) @ v",
    "weights_stored": "    w = (q @ k.transpose(-2, -1)).softmax(-1)\n    STORE['w'] = w.detach()\n    return w @ v",
    "inplace_on_view": "    s = q @ k.transpose(-2, -1) * 0.5\n"
                       "    s[..., 0].mul_(2.0)\n    return s.softmax(-1) @ v",
    "dropout_on_copy": "    w = (q @ k.transpose(-2, -1)).softmax(-1)\n"
                       "    _ = F.dropout(w, 0.5, True)\n    return w @ v",
    "scores_batch_head_swapped": "    return (q @ k.transpose(-2, -1)).transpose(0, 1).softmax(-1) @ v",  # B == H
    "weights_reshaped_across_keys": "    w = (q @ k.transpose(-2, -1)).softmax(-1)\n"
                                    "    return w.reshape(B, H, L // 2, 2 * L) @ v.reshape(B, H, 2 * L, D // 2)",
}


def _compile_source(source: str):
    namespace = {"torch": torch, "F": F, "math": math, "B": B, "H": H, "L": L, "D": D, "STORE": {}}
    exec(compile(source, "<generated attention program>", "exec"), namespace)
    return namespace["program"]


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 1, L, L, generator=g)
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, -2:] = False
    return q, k, v, bias, keep


def _run(fn, inputs):
    q, k, v, bias, keep = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = fn(q, k, v, bias, keep)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [q.grad, k.grad, v.grad]


def _compile_and_compare(source: str, seed: int) -> almostlinear.Report:
    """Compile the program in exact mode; outputs and gradients must equal eager. Returns the report."""
    fn = _compile_source(source)
    torch._dynamo.reset()
    backend = almostlinear.Backend(method="exact", inner="eager")
    compiled = torch.compile(fn, backend=backend)
    inputs = _inputs(seed)
    out, grads = _run(compiled, inputs)
    ref_out, ref_grads = _run(fn, inputs)
    for a, b in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    return backend.reports[-1]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(program=attention_programs(), seed=st.integers(0, 2**16))
def test_random_attention_programs_are_found_and_exact(program, seed):
    source, kind, scale, kept = program
    report = _compile_and_compare(source, seed)
    assert len(report.sites) == 1, f"{source}\n{report}"
    assert not report.near_misses, f"{source}\n{report}"
    site = report.sites[0]
    if kept:  # a score transform: found, mask classified, kept as written
        assert not site.rewritten and site.method == "unchanged", f"{source}\n{report}"
        assert site.reason.startswith(kept), f"{source}\n{report}"
    else:
        assert site.rewritten and site.method == "exact", f"{source}\n{report}"
    assert site.mask_kind == kind, f"{source}\n{report}"
    assert site.causal == kind.startswith("causal"), f"{source}\n{report}"
    assert site.scale is not None and math.isclose(site.scale, scale, rel_tol=1e-6), f"{source}\n{report}"


@settings(max_examples=40, deadline=None, derandomize=True)
@given(name=st.sampled_from(sorted(LOOKALIKES)), seed=st.integers(0, 2**16))
def test_lookalikes_are_never_rewritten(name, seed):
    source = "def program(q, k, v, bias, keep):\n" + LOOKALIKES[name]
    report = _compile_and_compare(source, seed)
    assert not any(s.rewritten for s in report.sites), f"{source}\n{report}"
    if "softmax" in source:  # explained: a near miss, or a site kept as written with its reason
        kept = [s for s in report.sites if s.method == "unchanged" and s.reason.startswith("kept as written")]
        assert report.near_misses or kept, f"{source}: a softmax that is not rewritten must be explained\n{report}"
