"""Where the approximation applies: train the example GPT with softmax attention and, at a few checkpoints,
ask almostlinear how much of it degree-2 polynomial attention could replace.

    python benchmarks/reach.py                          # the main job's GPT; 3-8 minutes on 2 CPU cores
    python benchmarks/reach.py --seq-len 256 --checkpoints 0,50,100,300,600
    python benchmarks/reach.py --exact-window 32 --out benchmarks/results/reach_window32.md   # auto may add a window

The model trains uncompiled (plain PyTorch softmax attention, AdamW) on the standard library's source, as in
examples/train_gpt.py. At each checkpoint a copy is compiled twice on one held-out batch, through the public
API only:

* `Backend(method="auto", budget=B, min_seq_len=0)`: its report's approximability map gives, per query head,
  the logit std and max, the effective number of keys (exp of the attention's entropy) and the sampled degree-2
  error; we count the heads whose sampled error is within the budget, and the heads auto actually
  approximated (after its end-to-end gradient check and back-off), with auto's measured gradient error.
* `Backend(method="polynomial", min_seq_len=0)`: every head forced polynomial; its report's gradient error is
  the end-to-end distance of the gradients to softmax attention.

Prints a markdown table and writes it to benchmarks/results/reach.md (or --out).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

import almostlinear
from almostlinear.zoo import GPT, GPTConfig
from almostlinear.zoo.data import batches, split, stdlib_text


def report_of(model: GPT, method: str, x: torch.Tensor, y: torch.Tensor, budget: float, exact_window: int = 0):
    """Compile a copy of `model` with `method` and run one training call on (x, y): the backend plans at
    compile time on these inputs and returns the report (the copy and its gradients are thrown away)."""
    torch._dynamo.reset()
    backend = almostlinear.Backend(method=method, budget=budget, min_seq_len=0, inner="eager",
                                   exact_window=exact_window)
    compiled = torch.compile(copy.deepcopy(model), backend=backend)
    compiled(x, y)
    return backend.reports[-1]


@torch.no_grad()
def validation_loss(model: GPT, val: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    loss = sum(float(model(x, y)) for x, y in val) / len(val)
    model.train()
    return loss


def summary(step: int, val_loss: float, auto, poly, budget: float) -> dict:
    heads = [h for s in auto.sites for h in s.heads]
    if not heads:
        raise RuntimeError(f"the auto report has no approximability map:\n{auto}")
    stds = [h["logit_std"] for h in heads]
    keys = [h["effective_keys"] for h in heads]
    return dict(
        step=step,
        val_loss=val_loss,
        std=(min(stds), max(stds)),
        logit_max=max(h["logit_max"] for h in heads),
        keys=(min(keys), max(keys)),
        within=sum(h["sampled_error"] <= budget for h in heads),
        approximated=sum(bool(h["approximated"]) for h in heads),
        heads=len(heads),
        sites_auto=sum(s.method == "polynomial" for s in auto.sites),
        sites_window=sum(s.method == "polynomial" and bool(s.exact_window) for s in auto.sites),
        sites=len(auto.sites),
        auto_error=auto.grad_error,
        poly_error=poly.grad_error,
        sampled=(min(h["sampled_error"] for h in heads), max(h["sampled_error"] for h in heads)),
    )


def table(rows: list[dict], budget: float) -> list[str]:
    def err(v):
        return "-" if v is None else f"{v:.3g}"

    lines = [f"| step | val loss | logit std (min–max over heads) | max \\|logit\\| | effective keys (min–max) "
             f"| sampled error (min–max) | heads with sampled error ≤ {budget:g} | heads auto approximated "
             f"(sites) | auto gradient error | gradient error, all heads polynomial |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        windowed = f", {r['sites_window']} with the window" if r.get("sites_window") else ""
        lines.append(
            f"| {r['step']} | {r['val_loss']:.3f} | {r['std'][0]:.2f}–{r['std'][1]:.2f} | {r['logit_max']:.1f} "
            f"| {r['keys'][0]:.1f}–{r['keys'][1]:.1f} | {r['sampled'][0]:.3g}–{r['sampled'][1]:.3g} "
            f"| {r['within']}/{r['heads']} ({100 * r['within'] / r['heads']:.0f}%) "
            f"| {r['approximated']}/{r['heads']} ({r['sites_auto']}/{r['sites']}{windowed}) "
            f"| {err(r['auto_error']) if r['approximated'] else '- (all exact)'} "
            f"| {err(r['poly_error'])} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128, help="model width (head dim = embd / heads)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--checkpoints", default="0,25,50,100,200,400",
                        help="comma-separated training steps at which to measure (the last one ends training)")
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--exact-window", type=int, default=0,
                        help="the option exact_window for both compiles (auto: per site, where it brings heads in)")
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reach.md"))
    args = parser.parse_args(argv)
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",")})

    train_data, val_data = split(stdlib_text())
    config = GPTConfig(vocab_size=256, block_size=args.seq_len, n_layer=args.layers, n_head=args.heads,
                       n_embd=args.embd, dropout=0.0)
    torch.manual_seed(args.seed)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    val = list(batches(val_data, args.seq_len, args.batch, args.val_batches, seed=12345))
    probe_x, probe_y = val[0]  # the held-out batch both compiles plan on
    header = (f"char-level GPT {args.layers} layers x {args.heads} heads of dim {args.embd // args.heads}, context "
              f"{args.seq_len}, batch {args.batch}, AdamW lr {args.lr}, softmax attention (uncompiled); budget "
              f"{args.budget}; exact_window {args.exact_window}; machine {platform.machine()}, {torch.get_num_threads()} threads, torch "
              f"{torch.__version__}, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(header, flush=True)
    rows, step, started = [], 0, time.perf_counter()
    iterator = batches(train_data, args.seq_len, args.batch, checkpoints[-1], args.seed)
    for checkpoint in checkpoints:
        while step < checkpoint:
            x, y = next(iterator)
            loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        auto = report_of(model, "auto", probe_x, probe_y, args.budget, args.exact_window)
        poly = report_of(model, "polynomial", probe_x, probe_y, args.budget, args.exact_window)
        rows.append(summary(step, validation_loss(model, val), auto, poly, args.budget))
        print("\n".join(table(rows[-1:], args.budget)[2:]), f"  [{time.perf_counter() - started:.0f} s]", flush=True)
        if checkpoint == checkpoints[-1]:
            print(f"\nthe auto report at step {step} (per site and per head):\n{auto}")

    command = "python benchmarks/reach.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"`{command.strip()}`", "", header, "", *table(rows, args.budget)]
    print("\n" + "\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
