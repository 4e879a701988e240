"""A fingerprint of what the backend does to a fixed GPT, to compare two checkouts after a refactor.

    PYTHONPATH=/path/to/checkout_a python benchmarks/rewrite_fingerprint.py > a.txt
    PYTHONPATH=/path/to/checkout_b python benchmarks/rewrite_fingerprint.py > b.txt
    diff a.txt b.txt          # empty: the same rewritten graphs, outputs, decisions and errors

For each option set: the output (sum, 10 digits), the measured gradient error, each site's method,
coefficients, sampled and measured errors, and the SHA-1 of the rewritten graph's code. Runs with
inner="eager" (the rewrite only), GPT 2 layers x 4 heads of d = 64, T = 256 by default (--seq-len).
"""
from __future__ import annotations

import argparse
import hashlib
import re
import warnings

import torch

import almostlinear
from almostlinear.zoo.gpt import GPT, GPTConfig

OPTION_SETS = (dict(method="exact"), dict(method="polynomial", min_seq_len=0), dict(method="auto", min_seq_len=0),
               dict(method="auto", min_seq_len=0, budget=1e-4),
               dict(method="polynomial", min_seq_len=0, recheck_every=1))


def fingerprint(options: dict, seq_len: int) -> str:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=seq_len, n_layer=2, n_head=4, n_embd=256, dropout=0.0))
    backend = almostlinear.Backend(inner="eager", **options)
    x = torch.randint(0, 96, (1, seq_len), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.compile(model, backend=backend)(x)
    report = backend.reports[-1]
    code = re.sub(r"graph_\d+", "G", report.graph_after)
    sites = [(str(s.method), s.coefficients, s.sampled_error, s.measured_error) for s in report.sites]
    return (f"{options}: out {float(out.detach().double().sum()):.10e} grad_error {report.grad_error} {sites} "
            f"code {hashlib.sha1(code.encode()).hexdigest()[:12]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    for options in OPTION_SETS:
        print(fingerprint(options, args.seq_len))


if __name__ == "__main__":
    main()
