"""Matcher coverage on real models we did not write: sites expected, found, rewritten, mask kinds, and the
largest difference to eager (outputs and all gradients) in exact mode.

    python benchmarks/real_models.py            # prints a markdown table (about 2 minutes on 2 CPU cores)
"""
from __future__ import annotations

import datetime
import os
import platform

import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import almostlinear  # noqa: E402
from almostlinear.zoo import GPT, GPTConfig, build  # noqa: E402


class _Call(nn.Module):
    def __init__(self, model, kwargs, pick):
        super().__init__()
        self.model, self.kwargs, self.pick = model, kwargs, pick

    def forward(self, *args):
        return self.pick(self.model(*args, **self.kwargs))


def _hf(name, impl):
    model, ids, kwargs = build(name, impl)
    return _Call(model, kwargs, lambda o: o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state), (ids,)


def _mha(need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 16, 32)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[1, 10:] = True
    return _Call(mha, {"key_padding_mask": pad, "need_weights": need_weights}, lambda o: o[0]), (x, x, x)


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    x = torch.randn(2, 16, 32)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[1, 10:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(16)

    class Causal(nn.Module):  # the causal mask built inside the compiled code, as a user would
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            mask = torch.triu(torch.full((x.size(1), x.size(1)), float("-inf")), diagonal=1)
            return self.layer(x, src_mask=mask, src_key_padding_mask=pad.float().masked_fill(pad, float("-inf")))

    del causal
    return Causal(), (x,)


def _nanogpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)), (torch.randint(0, 96, (2, 16)),)


CASES = [  # name, builder, sites expected
    *[(f"HF {n} ({i})", (lambda n=n, i=i: _hf(n, i)), 2) for n in ("gpt2", "bert", "llama", "mistral") for i in ("eager", "sdpa")],
    ("nn.MultiheadAttention need_weights=False, key_padding_mask", lambda: _mha(False), 1),
    ("nn.MultiheadAttention need_weights=True", lambda: _mha(True), 1),
    ("nn.TransformerEncoderLayer causal + padding", _encoder, 1),
    ("nanoGPT (causal buffer, dropout module)", _nanogpt, 2),
]


def _grads_and_outputs(fn, model, inputs):
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*inputs)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    wrt = params + [x for x in inputs if x.requires_grad]
    return [out.detach()] + [g if g is not None else torch.zeros(()) for g in torch.autograd.grad(out, wrt, cot, allow_unused=True)]


def main() -> None:
    print(f"# almostlinear matcher on real models (exact mode)\n\nmachine: {platform.machine()}, {os.cpu_count()} cores; "
          f"torch {torch.__version__}; date {datetime.datetime.now():%Y-%m-%d %H:%M}\n")
    print("| model | sites expected | found | rewritten | mask kinds | max rel. diff to eager (outputs, grads) | near misses |")
    print("|---|---|---|---|---|---|---|")
    for name, make, expected in CASES:
        torch._dynamo.reset()
        model, inputs = make()
        model.train()
        backend = almostlinear.Backend(method="exact", inner="aot_eager")
        compiled = torch.compile(model, backend=backend)
        ref = _grads_and_outputs(model, model, inputs)
        got = _grads_and_outputs(compiled, model, inputs)
        scale = max(float(b.abs().max()) for b in ref)  # relative to the largest reference entry
        diff = max(float((a - b).abs().max()) for a, b in zip(got, ref)) / max(scale, 1e-30)
        report = almostlinear.rewriter.merge_reports(backend.reports, name)
        sites = report.sites
        kinds = ", ".join(sorted({s.mask_kind for s in sites})) or "-"
        rewritten = sum(s.rewritten for s in sites)
        misses = "; ".join(sorted({m.reason for m in report.near_misses})) or "-"
        found = len(sites) + sum(1 for m in report.near_misses if m.form == "mha")
        print(f"| {name} | {expected} | {found} | {rewritten} | {kinds} | {diff:.2e} | {misses} |", flush=True)


if __name__ == "__main__":
    main()
