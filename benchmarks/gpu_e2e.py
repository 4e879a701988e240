"""End-to-end check on a CUDA GPU: a GPT compiled with almostlinear (polynomial and auto) trains through the
Triton op; loss and gradients are compared with exact attention. One short run (~2 min with compiles).

    python benchmarks/gpu_e2e.py [--seq-len 16384] [--inner aot_eager|inductor]
"""
from __future__ import annotations

import argparse
import time

import torch

import almostlinear
from almostlinear.zoo import GPT, GPTConfig


def run(config, tokens, **options):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(config).cuda()
    backend = almostlinear.Backend(**options)
    compiled = torch.compile(model, backend=backend)
    loss = compiled(tokens, tokens)
    loss.backward()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        for p in model.parameters():
            p.grad = None
        started = time.perf_counter()
        loss = compiled(tokens, tokens)
        loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return float(loss.detach()), grads, min(times), backend.reports[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--inner", default="aot_eager")
    args = parser.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    config = GPTConfig(vocab_size=256, block_size=args.seq_len, n_layer=2, n_head=4, n_embd=256)
    tokens = torch.randint(0, 256, (1, args.seq_len), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    exact = run(config, tokens, method="exact", inner=args.inner)
    poly = run(config, tokens, method="polynomial", min_seq_len=0, inner=args.inner)
    auto = run(config, tokens, method="auto", inner=args.inner)
    for name, (loss, grads, seconds, report) in (("exact", exact), ("polynomial", poly), ("auto", auto)):
        err = float((grads - exact[1]).norm() / exact[1].norm())
        print(f"{name:10s} loss {loss:.5f}  grad rel. diff vs exact {err:.2e}  step {seconds * 1000:.1f} ms  "
              f"sites {[s.method for s in report.sites]}  reported grad error {report.grad_error}", flush=True)
    assert torch.isfinite(poly[1]).all(), "non-finite gradients through the polynomial op"
    print(poly[3])


if __name__ == "__main__":
    main()
