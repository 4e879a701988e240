"""Converting a softmax-trained model to linear-time attention: fine-tune copies of one softmax-trained GPT with
softmax, with polynomial attention, and with polynomial attention plus an exact window, on the same batches.

    python benchmarks/convert.py                      # ~25 minutes on 2 CPU cores (the pretraining is cached)
    python benchmarks/convert.py --windows 64,16 --finetune-steps 200 --transfer-steps 25

1. Pretrain: the example GPT (zoo.GPT; 4 layers x 4 heads of 32, context 512) trained with plain PyTorch
   softmax attention (uncompiled, AdamW --lr) on the standard library's source; cached in --cache keyed by the
   configuration, so later runs start from the same model.
2. Fine-tune copies on the same batches (AdamW --ft-lr, batch --batch): (a) softmax (the reference, uncompiled),
   (b) `torch.compile(model, backend=Backend(method="polynomial"))`, (c) the same with `exact_window=W` for every
   W in --windows. The validation loss (fixed held-out batches, through each copy as it trains) at steps 0
   (the swap alone), 10, 25, 50, 100, 200.
3. Attention transfer (LoLCATs-style, --transfer-steps T > 0): for the first window in --windows, T steps in
   which only the attention's q/k/v projections train, to make each layer's windowed polynomial attention
   output match its softmax output (MSE; the layers' inputs from the softmax model), then plain fine-tuning:
   compared with plain fine-tuning at equal total steps.

Prints a markdown table (and the gap to the softmax reference), writes it to benchmarks/results/convert.md and
a plot to benchmarks/results/convert.png (with matplotlib).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import importlib.util
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import almostlinear
from almostlinear.kernels import poly_window_attention
from almostlinear.zoo import GPT, GPTConfig
from almostlinear.zoo.data import batches, split, stdlib_text


def pretrained(config: GPTConfig, data, args) -> GPT:
    """The softmax-trained GPT (cached by configuration)."""
    key = hashlib.sha1(repr((config, args.pretrain_steps, args.lr, args.batch, args.seed)).encode()).hexdigest()[:12]
    path = args.cache / f"convert_softmax_{key}.pt"
    torch.manual_seed(args.seed)
    model = GPT(config)
    if path.exists():
        model.load_state_dict(torch.load(path))
        print(f"pretrained softmax model loaded from {path}", flush=True)
        return model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    started = time.perf_counter()
    for step, (x, y) in enumerate(batches(data, config.block_size, args.batch, args.pretrain_steps, args.seed)):
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"  pretrain step {step}: loss {float(loss.detach()):.3f} [{time.perf_counter() - started:.0f} s]", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def validation_loss(model, val) -> float:
    """Mean loss on the fixed held-out batches, through `model` as it trains (grad mode on, no backward: a
    no_grad call would compile a second, inference graph)."""
    return sum(float(model(x, y).detach()) for x, y in val) / len(val)


def attention_transfer(model: GPT, x: torch.Tensor, exact_window: int, coefficients: list) -> torch.Tensor:
    """Sum over layers of MSE(windowed polynomial attention, softmax attention) with the layers' inputs from the
    softmax model (detached): the loss of the transfer phase (gradients reach the q/k/v projections only)."""
    T = x.size(1)
    with torch.no_grad():
        h = model.drop(model.wte(x) + model.wpe(torch.arange(T)))
    loss = h.new_zeros(())
    for block, coeffs in zip(model.h, coefficients):
        attn = block.attn
        with torch.no_grad():
            inp = block.ln_1(h)
        B, _, C = inp.shape
        q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)
                   for t in attn.c_attn(inp).split(attn.n_embd, dim=2))
        scale = (C // attn.n_head) ** -0.5
        with torch.no_grad():
            target = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        approx = poly_window_attention(q, k, v, scale=scale, exact_window=exact_window, causal=True,
                                       coefficients=coeffs)
        loss = loss + F.mse_loss(approx, target)
        with torch.no_grad():
            h = block(h)
    return loss


def finetune(name: str, base: GPT, train_data, val, args, checkpoints, options=None, transfer=0) -> dict:
    """Fine-tune a copy of `base` for max(checkpoints) steps; the validation loss at each checkpoint."""
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    backend = None
    runner = model
    if options is not None:
        backend = almostlinear.Backend(min_seq_len=0, inner="aot_eager", **options)
        runner = torch.compile(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.ft_lr, weight_decay=0.0)
    losses, started = {}, time.perf_counter()
    stream = batches(train_data, args.seq_len, args.batch, max(checkpoints), args.seed + 1)
    if 0 in checkpoints:
        losses[0] = validation_loss(runner, val)
    if transfer:
        coefficients = [list(s.coefficients) if s.coefficients else None for s in backend.reports[-1].sites]
        params = [p for block in model.h for p in block.attn.c_attn.parameters()]
        transfer_opt = torch.optim.AdamW(params, lr=args.ft_lr, weight_decay=0.0)
    for step in range(1, max(checkpoints) + 1):
        x, y = next(stream)
        if step <= transfer:
            loss = attention_transfer(model, x, options["exact_window"], coefficients)
            transfer_opt.zero_grad(set_to_none=True)
            loss.backward()
            transfer_opt.step()
        else:
            loss = runner(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if step in checkpoints:
            losses[step] = validation_loss(runner, val)
            print(f"  {name}: step {step} val {losses[step]:.4f} [{time.perf_counter() - started:.0f} s]", flush=True)
    return dict(name=name, losses=losses, seconds=time.perf_counter() - started,
                report=backend.reports[-1] if backend and backend.reports else None)


def table(runs: list[dict], checkpoints: list[int]) -> list[str]:
    reference = runs[0]["losses"]
    lines = ["| fine-tune steps | " + " | ".join(r["name"] for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for step in checkpoints:
        cells = [f"{reference[step]:.3f}"]
        for r in runs[1:]:
            gap = 100 * (r["losses"][step] - reference[step]) / reference[step]
            cells.append(f"{r['losses'][step]:.3f} ({gap:+.1f}%)")
        lines.append(f"| {step}{' (swap only)' if step == 0 else ''} | " + " | ".join(cells) + " |")
    return lines


def plot(runs: list[dict], path: Path, title: str) -> str:
    if importlib.util.find_spec("matplotlib") is None:
        return "plot skipped: matplotlib is not installed"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        steps = sorted(r["losses"])
        ax.plot([max(s, 1) for s in steps], [r["losses"][s] for s in steps], marker="o", label=r["name"])
    ax.set_xscale("log")
    ax.set_xlabel("fine-tune steps (0 plotted at 1: the swap alone)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return f"plot: {path}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3, help="pretraining learning rate")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--ft-lr", type=float, default=3e-4, help="fine-tuning learning rate")
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--windows", default="64,16", help="exact windows to try (comma-separated)")
    parser.add_argument("--transfer-steps", type=int, default=25, help="attention transfer steps (0: skip)")
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/convert.md"))
    args = parser.parse_args(argv)
    windows = [int(w) for w in args.windows.split(",") if w]
    checkpoints = [s for s in (0, 10, 25, 50, 100, 200, 400) if s <= args.finetune_steps]

    train_data, val_data = split(stdlib_text())
    config = GPTConfig(vocab_size=256, block_size=args.seq_len, n_layer=args.layers, n_head=args.heads,
                       n_embd=args.embd, dropout=0.0)
    header = (f"char-level GPT {args.layers} layers x {args.heads} heads of {args.embd // args.heads}, context "
              f"{args.seq_len}; pretrained with softmax for {args.pretrain_steps} steps (AdamW lr {args.lr}, batch "
              f"{args.batch}), fine-tuned with AdamW lr {args.ft_lr}, batch {args.batch}, the same batches for every "
              f"run; validation on {args.val_batches} held-out batches; {platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(header, flush=True)
    base = pretrained(config, train_data, args)
    val = list(batches(val_data, args.seq_len, args.batch, args.val_batches, seed=12345))
    runs = [finetune("softmax (reference)", base, train_data, val, args, checkpoints),
            finetune("polynomial", base, train_data, val, args, checkpoints, dict(method="polynomial"))]
    for w in windows:
        runs.append(finetune(f"polynomial + exact window {w}", base, train_data, val, args, checkpoints,
                             dict(method="polynomial", exact_window=w)))
    transfer = None
    if args.transfer_steps and windows:
        transfer = finetune(f"window {windows[0]}, {args.transfer_steps} attention-transfer steps first", base,
                            train_data, val, args, [c for c in checkpoints if c == 0 or c > args.transfer_steps],
                            dict(method="polynomial", exact_window=windows[0]), transfer=args.transfer_steps)
    command = "python benchmarks/convert.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"`{command.strip()}`", "", header, "", *table(runs, checkpoints)]
    if transfer is not None:
        plain = runs[2]
        lines += ["", f"Attention transfer ({args.transfer_steps} steps training the q/k/v projections to match each "
                      f"layer's softmax output, then fine-tuning) against plain fine-tuning, window {windows[0]}, "
                      f"equal total steps:", "",
                  "| total steps | plain fine-tuning | transfer, then fine-tuning |", "|---|---|---|"]
        for step in sorted(transfer["losses"]):
            if step:
                lines.append(f"| {step} | {plain['losses'][step]:.3f} | {transfer['losses'][step]:.3f} |")
    seconds = ", ".join(f"{r['name']} {r['seconds']:.0f} s" for r in runs)
    lines += ["", f"wall time of each fine-tune (with its validation passes): {seconds}"]
    print("\n" + "\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(plot(runs + ([transfer] if transfer else []), args.out.with_suffix(".png"),
               f"converting a softmax-trained GPT (context {args.seq_len})"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
