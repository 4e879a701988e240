"""The error budget at work: a 4-layer GPT at initialisation (small logits: approximated within budget) and
after its attention logits grow as training makes them (large logits: kept exact), with measured errors.

    python examples/budget_demo.py [--seq-len 512] [--budget 0.05] [--growth 6]
"""
from __future__ import annotations

import argparse

import torch

import almostlinear
from almostlinear.zoo import GPT, GPTConfig


def report_for(model, tokens, budget):
    torch._dynamo.reset()
    backend = almostlinear.Backend(budget=budget, min_seq_len=0, inner="aot_eager")
    torch.compile(model, backend=backend)(tokens, tokens)
    return backend.reports[-1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--growth", type=float, default=6.0, help="factor on q and k of layers 2 and 3")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=args.seq_len, n_layer=4, n_head=4, n_embd=128))
    tokens = torch.randint(0, 256, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    print("== at initialisation ==")
    print(report_for(model, tokens, args.budget))
    with torch.no_grad():
        for block in model.h[2:]:
            block.attn.c_attn.weight[: 2 * 128].mul_(args.growth ** 0.5)
    print(f"\n== after the logits of layers 2 and 3 grew {args.growth}x ==")
    print(report_for(model, tokens, args.budget))


if __name__ == "__main__":
    main()
