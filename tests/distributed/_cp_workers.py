"""What each rank runs for the context-parallel tests (tests/distributed/test_context_parallel.py), and the
single-process references: every scenario compiles a model for a sequence split over the ranks, runs one
forward and backward on this rank's shard and returns its outputs and its parameters' gradients (summed over the
ranks by the test), or an error string."""
from __future__ import annotations

import contextlib
import traceback

import torch
import torch.nn as nn

T = 48
TAYLOR = {"method": "polynomial", "min_seq_len": 0, "coefficients": "taylor", "inner": "aot_eager"}
EXACT = {"method": "exact", "inner": "aot_eager"}


def gpt():
    from almostlinear.zoo.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=T, n_layer=2, n_head=2, n_embd=32))


class AlibiGQA(nn.Module):
    """Causal attention with an ALiBi bias tensor slopes * (j - i) and GQA (2 key/value heads for 4 query heads,
    repeat_interleave): a BLOOM/MPT-style layer.  (ALiBi with a data-dependent padding mask is classified dense by
    the matcher, single-process too: padding is covered by the encoder and Llama scenarios.)"""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        torch.manual_seed(1)
        self.h, self.kvh, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.d)
        self.o = nn.Linear(dim, dim)
        self.register_buffer("slopes", torch.tensor([0.5, 0.25, 0.125, 0.0625]).view(1, heads, 1, 1))

    def forward(self, x):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(B, L, 2, self.kvh, self.d).permute(2, 0, 3, 1, 4)
        k, v = (t.repeat_interleave(self.h // self.kvh, dim=1) for t in (k, v))
        s = (q @ k.transpose(-1, -2)) / self.d ** 0.5
        rel = (torch.arange(L).view(1, L) - torch.arange(L).view(L, 1)).to(s.dtype)
        s = s + self.slopes * rel
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        return self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(B, L, -1))


def encoder():
    torch.manual_seed(2)
    return nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)


def llama():
    from almostlinear import zoo

    model, _, _ = zoo.build("llama", impl="sdpa", layers=2, seq_len=T)
    return model


def inputs(name):
    g = torch.Generator().manual_seed(3)
    if name.startswith("gpt"):
        return {"idx": torch.randint(0, 96, (2, T), generator=g)}
    if name == "alibi":
        return {"x": torch.randn(2, T, 32, generator=g)}
    if name == "encoder":
        pad = torch.zeros(2, T, dtype=torch.bool)
        pad[0, 40:] = True
        return {"src": torch.randn(2, T, 32, generator=g), "src_key_padding_mask": pad}
    if name == "llama":
        mask = torch.ones(2, T, dtype=torch.long)
        mask[1, 36:] = 0
        return {"input_ids": torch.randint(0, 100, (2, T), generator=g), "attention_mask": mask}
    raise KeyError(name)


AUTO = {"method": "auto", "min_seq_len": 0, "coefficients": "taylor", "inner": "aot_eager", "guard": False}
MODELS = {"gpt": gpt, "gpt_inductor": gpt, "gpt_exact": gpt, "alibi": AlibiGQA, "encoder": encoder, "llama": llama,
          "gpt_auto": gpt, "gpt_heads": gpt}
OPTIONS = {"gpt_inductor": dict(TAYLOR, inner="inductor"), "gpt_exact": EXACT, "gpt_auto": AUTO, "gpt_heads": AUTO}


@contextlib.contextmanager
def first_head_only(active: bool = True):
    """While active, `auto` approximates key/value head 0 of every site and keeps the others exact (a per-head
    decision, as the search takes when only some heads fit), so that the context-parallel split of a site into an
    approximated and an exact part can be compared with the single-process per-head op.  Restored on exit (the
    reference runs in the pytest process)."""
    import dataclasses

    from almostlinear.kinds import Method
    from almostlinear.rewriter import search

    calibrate_all = search._calibrate_all

    def patched(s, *args, **kwargs):
        calibrate_all(s, *args, **kwargs)
        for sid, d in list(s.decisions.items()):
            if d.method is Method.POLYNOMIAL:
                s.decisions[sid] = dataclasses.replace(d, heads=(0,), guard=None)

    if not active:
        yield
        return
    search._calibrate_all = patched
    try:
        yield
    finally:
        search._calibrate_all = calibrate_all


def _call(model, name, args, positions):
    if name.startswith("gpt"):
        return model(args["idx"], positions=positions)
    if name == "alibi":
        return model(args["x"])
    if name == "encoder":
        return model(args["src"], src_key_padding_mask=args["src_key_padding_mask"])
    return model(input_ids=args["input_ids"], attention_mask=args["attention_mask"],
                 position_ids=positions.unsqueeze(0).expand(2, -1)).logits


def _shard(args, lengths, rank):
    start, n = sum(lengths[:rank]), lengths[rank]
    return {k: v.narrow(1, start, n) for k, v in args.items()}, torch.arange(start, start + n)


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def reference(name, options=None):
    """The whole sequence in one process (the same options, no context parallelism)."""
    import almostlinear

    torch._dynamo.reset()
    model = MODELS[name]()
    args = inputs(name)
    backend = almostlinear.Backend(**dict(OPTIONS.get(name, TAYLOR), **(options or {})))
    with first_head_only(name == "gpt_heads"):
        out = _call(torch.compile(model, backend=backend, dynamic=False), name, args, torch.arange(T))
    (out * _cotangent(out.shape)).sum().backward()
    torch._dynamo.reset()
    return out.detach(), _grads(model)


def _cotangent(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(4))


def scenario(rank, world, name, lengths, fullgraph=False):
    import almostlinear

    torch._dynamo.reset()
    model = MODELS[name]()
    args, positions = _shard(inputs(name), lengths, rank)
    compiled = almostlinear.context_parallel(model, **dict(OPTIONS.get(name, TAYLOR)))
    if fullgraph:
        compiled = torch.compile(model, backend=compiled.almostlinear_backend, dynamic=False, fullgraph=True)
    with first_head_only(name == "gpt_heads"):
        out = _call(compiled, name, args, positions)
    start = sum(lengths[:rank])
    cot = _cotangent((*out.shape[:1], T, *out.shape[2:])).narrow(1, start, lengths[rank])
    (out * cot).sum().backward()
    report = (compiled.almostlinear_backend if hasattr(compiled, "almostlinear_backend") else None)
    reports = report.reports if report is not None else []
    from almostlinear import assert_same_decisions

    return {"out": out.detach(), "grads": _grads(model), "report": str(reports[-1]) if reports else "",
            "graph": reports[-1].graph_after if reports else "", "decisions": assert_same_decisions(reports)}


def suite(rank, world, cases):
    results = {}
    for key, (name, lengths, fullgraph) in cases.items():
        try:
            results[key] = scenario(rank, world, name, lengths, fullgraph)
        except Exception:
            results[key] = traceback.format_exc()
    return results
