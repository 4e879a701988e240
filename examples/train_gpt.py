"""Train a character-level GPT at long context with backend="almostlinear", next to the same run with
exact attention (Inductor), and show what the backend decided, how fast each run was and the losses.

    python examples/train_gpt.py                      # defaults: 8k context, 20 steps, ~2.5 min on 2 CPU cores
    python examples/train_gpt.py --seq-len 8192 --layers 4 --steps 200 --budget 0.02 --device cuda

The text is the Python standard library's own source code (ships with every Python), read as bytes.
Writes a PNG with both loss curves and the per-site decisions over time (default results/train_gpt.png).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

import almostlinear
from almostlinear.zoo import GPT, GPTConfig, timed_step


def stdlib_text(max_bytes: int = 4_000_000) -> torch.Tensor:
    """Bytes of the standard library's .py files, in a fixed order: uint8 tokens, vocabulary 256."""
    root = Path(os.__file__).parent
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def batches(data: torch.Tensor, seq_len: int, batch: int, steps: int, seed: int):
    """The same (input, target) batches for every run with the same seed."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([data[s : s + seq_len] for s in starts])
        y = torch.stack([data[s + 1 : s + seq_len + 1] for s in starts])
        yield x, y


@dataclass
class Run:
    name: str
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    compile_seconds: float = 0.0
    decisions: list[list[str]] = field(default_factory=list)  # per step, per site: method
    backend: almostlinear.Backend | None = None

    def tokens_per_second(self, tokens_per_step: int) -> float:
        timed = self.step_seconds[1:] or self.step_seconds  # the first step includes compilation
        return tokens_per_step * len(timed) / max(sum(timed), 1e-9)

    def final_loss(self, last: int = 10) -> float:
        tail = self.losses[-last:]
        return sum(tail) / len(tail)


def train(name: str, config: GPTConfig, data: torch.Tensor, *, steps: int, batch: int, seed: int, lr: float,
          device: str, progress: bool = True, **options) -> Run:
    """Train one model from the same initialisation on the same batches; `options` go to the backend."""
    torch.manual_seed(seed)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    backend = almostlinear.Backend(**options)
    compiled = torch.compile(model, backend=backend)
    run = Run(name, backend=backend)
    iterator = batches(data, config.block_size, batch, steps, seed)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"{name:>14}", unit="step", leave=True)
        except ImportError:  # progress is a nicety; the run itself needs nothing extra
            bar = None
    for step, (x, y) in enumerate(iterator):
        x, y = x.to(device), y.to(device)
        loss, elapsed = timed_step(compiled, optimizer, x, y, device)
        if step == 0:
            run.compile_seconds = elapsed
        run.step_seconds.append(elapsed)
        run.losses.append(float(loss.detach()))
        report = backend.reports[-1] if backend.reports else None
        run.decisions.append([s.method for s in report.sites] if report else [])
        if bar is not None:
            bar.set_postfix(loss=f"{run.losses[-1]:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return run


def plot(exact: Run, approx: Run, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_sites) = plt.subplots(2, 1, figsize=(8, 7), height_ratios=[3, 1.3])
    ax_loss.plot(exact.losses, label="exact attention (Inductor)")
    ax_loss.plot(approx.losses, label="almostlinear (auto)", alpha=0.8)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (nats/byte)")
    ax_loss.set_title(title)
    ax_loss.legend()
    decisions = approx.decisions
    n_sites = max((len(d) for d in decisions), default=0)
    if n_sites:
        grid = torch.tensor([[1.0 if m == "polynomial" else 0.0 for m in d] + [0.0] * (n_sites - len(d))
                             for d in decisions]).T
        ax_sites.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
        ax_sites.set_yticks(range(n_sites))
        ax_sites.set_yticklabels([s.module_path for s in approx.backend.reports[-1].sites])
    ax_sites.set_xlabel("step (green: polynomial, red: exact)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192, help="context length (default 8192)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128, help="model width (head dim = embd / heads)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--recheck-every", type=int, default=10)
    parser.add_argument("--min-seq-len", type=int, default=None, help="override the measured crossover")
    parser.add_argument("--inner", choices=["inductor", "aot_eager", "eager"], default="inductor")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/train_gpt.png"))
    args = parser.parse_args(argv)
    if args.embd % args.heads:
        parser.error(f"--embd {args.embd} must be divisible by --heads {args.heads}")

    data = stdlib_text()
    config = GPTConfig(vocab_size=256, block_size=args.seq_len, n_layer=args.layers, n_head=args.heads,
                       n_embd=args.embd, dropout=0.0)
    common = dict(steps=args.steps, batch=args.batch, seed=args.seed, lr=args.lr, device=args.device)
    print(f"char-level GPT: {args.layers} layers, {args.heads} heads of dim {args.embd // args.heads}, context "
          f"{args.seq_len}, batch {args.batch}, {args.steps} steps on {len(data) / 1e6:.1f} MB of stdlib source; "
          f"device {args.device}, torch {torch.__version__}")
    exact = train("exact", config, data, method="exact", inner=args.inner, **common)
    approx = train("almostlinear", config, data, method="auto", inner=args.inner, budget=args.budget,
                   recheck_every=args.recheck_every, min_seq_len=args.min_seq_len, **common)

    for report in approx.backend.reports:
        print()
        print(report)
    tokens = args.batch * args.seq_len
    t_exact, t_approx = exact.tokens_per_second(tokens), approx.tokens_per_second(tokens)
    print()
    print(f"{'run':<14} {'tokens/s':>10} {'first step (compile) s':>24} {'final loss':>11}")
    for run, tps in ((exact, t_exact), (approx, t_approx)):
        print(f"{run.name:<14} {tps:>10.0f} {run.compile_seconds:>24.1f} {run.final_loss():>11.4f}")
    print(f"speed ratio almostlinear / exact: {t_approx / t_exact:.2f}x; final loss difference "
          f"{100 * (approx.final_loss() - exact.final_loss()) / exact.final_loss():+.2f}%")
    plot(exact, approx, args.out, f"char GPT, context {args.seq_len}, budget {args.budget}")
    print(f"loss curves and per-site decisions: {args.out}")


if __name__ == "__main__":
    main()
