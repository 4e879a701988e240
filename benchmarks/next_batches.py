"""Does the budget hold on the batches after the one auto planned on? (issue 25, part 2)

    python benchmarks/next_batches.py                       # about 1 minute on 2 CPU cores
    python benchmarks/next_batches.py --steps 10,20,40 --later 10 --budget 0.05

Two models, each compiled with `Backend(method="auto", min_seq_len=0, inner="eager")` on one planning batch, then
run (through the compiled model, as training would) on `--later` batches it never saw. For each batch: the relative
error of the compiled model's parameter gradients against the uncompiled model's, for the model's own loss.

* `gpt@N`: the example GPT (4 layers x 4 heads of 32, context 128, batch 8) trained N steps with softmax attention
  (AdamW, lr 3e-3) on the standard library's source; the planning and later batches are held-out text.
* `sharper`: one attention layer whose later batches have sharper attention than the planning batch (each row's
  input scale is 0.3 + 2 u^4, u uniform: a few rows are far sharper than most, and the planning batch has none);
  built to break a planner that only sees its one batch.

Both with the run-time guard (the default) and without it. Prints a markdown table and writes it to
benchmarks/results/next_batches.md (or --out).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
from pathlib import Path

import torch

import almostlinear
from almostlinear.zoo import GPT, GPTConfig
from almostlinear.zoo.data import batches, split, stdlib_text
from almostlinear.zoo.layer import AttentionLayer, heavy_tailed_batches


def trained_gpt(steps: int, seed: int = 0):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    train, held = split(stdlib_text())
    for x, y in batches(train, 128, 8, steps, seed=seed):
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model, held


def gradients(model, x, y) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model(x, y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def measure(name: str, model, data: list, budget: float, guard: bool) -> dict:
    torch._dynamo.reset()
    backend = almostlinear.Backend(method="auto", budget=budget, min_seq_len=0, inner="eager", guard=guard)
    compiled = torch.compile(copy.deepcopy(model), backend=backend)
    errors = []
    for x, y in data:
        exact = gradients(model, x, y)
        errors.append(float((gradients(compiled, x, y) - exact).norm() / exact.norm()))
    report = backend.reports[-1]
    heads = sum(sum(bool(h["approximated"]) for h in s.heads) for s in report.sites if s.heads)
    total = sum(len(s.heads) for s in report.sites if s.heads) or 0
    later = errors[1:]
    return {"model": name, "guard": guard, "planned": report.grad_error, "plan_batch": errors[0],
            "later_max": max(later), "later_median": sorted(later)[len(later) // 2],
            "over": sum(e > budget for e in later), "approximated": sum(e > 0 for e in later), "n": len(later),
            "heads": f"{heads}/{total}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="10,20,40", help="GPT training steps before planning")
    parser.add_argument("--later", type=int, default=10, help="later batches per model")
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "next_batches.md"))
    args = parser.parse_args()
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        model, held = trained_gpt(steps)
        data = list(batches(held, 128, 8, args.later + 1, seed=99))
        rows += [measure(f"gpt@{steps}", model, data, args.budget, guard) for guard in (True, False)]
    torch.manual_seed(0)
    layer = AttentionLayer()
    data = list(heavy_tailed_batches(torch.Generator().manual_seed(1), args.later + 1))
    rows += [measure("sharper", layer, data, args.budget, guard) for guard in (True, False)]
    lines = [f"budget {args.budget:g}; error = relative error of the parameter gradients of the model's loss, "
             f"compiled (auto) vs uncompiled", "",
             "| model | guard | heads approximated at planning | planned figure (held-out rows) | error on the "
             "planning batch | later batches: max | median | over budget | still approximated |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        planned = "-" if r["planned"] is None else f"{r['planned']:.3g}"
        lines.append(f"| {r['model']} | {'on' if r['guard'] else 'off'} | {r['heads']} | {planned} | "
                     f"{r['plan_batch']:.3g} | {r['later_max']:.3g} | {r['later_median']:.3g} | "
                     f"{r['over']}/{r['n']} | {r['approximated']}/{r['n']} |")
    lines += ["", f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, torch {torch.__version__}, "
                  f"`python benchmarks/next_batches.py --steps {args.steps} --later {args.later} --budget "
                  f"{args.budget:g}`"]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("# The budget on the batches after planning (issue 25)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
