"""Compile a small GPT with backend="almostlinear" and print what the backend found and did.

    python examples/compile_gpt.py [--seq-len 128] [--layers 2] [--method auto|exact|polynomial] [--inner inductor]
"""
from __future__ import annotations

import argparse
import time

import torch

import almostlinear
from almostlinear.rewriter.options import INNER_COMPILERS, METHODS
from almostlinear.zoo import GPT, GPTConfig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--method", choices=METHODS, default="auto")
    parser.add_argument("--inner", choices=INNER_COMPILERS, default="inductor")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=args.seq_len, n_layer=args.layers, n_head=4, n_embd=128))
    tokens = torch.randint(0, model.config.vocab_size, (2, args.seq_len))
    backend = almostlinear.Backend(method=args.method, inner=args.inner)
    compiled = torch.compile(model, backend=backend)

    started = time.perf_counter()
    loss = compiled(tokens, tokens)
    loss.backward()
    print(f"compiled and ran one training step in {time.perf_counter() - started:.1f} s (inner={args.inner})")
    eager_loss = model(tokens, tokens)
    print(f"loss compiled {loss.item():.6f} vs eager {eager_loss.item():.6f}")
    for report in backend.reports:
        print()
        print(report)


if __name__ == "__main__":
    main()
