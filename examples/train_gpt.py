"""Train one character-level GPT four ways on the same data from the same initialisation: exact softmax
attention, almostlinear's drop-in `auto` (with re-checks), polynomial attention from scratch, and polynomial
attention with an exact window.

    python examples/train_gpt.py                          # defaults: about 2 minutes on 2 quiet CPU cores
    python examples/train_gpt.py --seq-len 256 --steps 500   # the longer run in docs/benchmarks.md
    python examples/train_gpt.py --context-parallel 2        # the polynomial run, its sequence split over 2
                                                             # ranks (spawned here: gloo on CPU, NCCL on GPUs),
                                                             # against the same run on one rank

The four runs:

* `exact`      -- method="exact": every attention site is one fused exact SDPA call (the baseline).
* `auto`       -- method="auto": a drop-in that never changes the model beyond the gradient-error budget. At
                  the first step it approximates the heads whose measured error fits; every `--recheck-every`
                  steps it re-measures them on that step's batch and switches those now over budget to exact.
                  As training sharpens the attention (the logits grow), the re-checks hand heads back to softmax.
* `polynomial` -- method="polynomial": the model trains with degree-2 polynomial attention from the first
                  step (no gate; the report's gradient error is its distance to softmax, as information), with
                  Taylor coefficients (coefficients="taylor": a fit to the initialisation's logits ended 0.2-1.1%
                  higher).
* `window`     -- method="polynomial" with exact_window=W (default: a quarter of the context): exact softmax on
                  each query's W nearest keys, the polynomial on the older ones, one normaliser.

`min_seq_len=0` makes every site eligible at this small context. On this CPU the op only pays off from
several thousand tokens (see the README's benchmarks), so at the default context the polynomial runs are not
faster than exact attention; the point of the default run is the decisions and the losses, which need a
few hundred steps and therefore a short context on 2 cores. The inner compiler is aot_eager (an Inductor
compile takes 25-60 s per graph on this CPU); `--inner inductor` and a long `--seq-len` measure speed.

The text is the Python standard library's own source code (ships with every Python), read as bytes
(vocabulary 256); the last 10% is held out for the validation loss. Writes a PNG with the three training-loss
curves and auto's per-site decisions over time (default results/train_gpt.png; needs matplotlib).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import almostlinear
from almostlinear.zoo import GPT, GPTConfig, timed_step
from almostlinear.zoo.data import batches, split, stdlib_text

METHODS = ("exact", "auto", "polynomial", "window")


def heads_approximated(site) -> int:
    """How many of a site's query heads run the polynomial op (from the report row: the map's flags)."""
    if site.heads:
        return sum(bool(h["approximated"]) for h in site.heads)
    if site.method != "polynomial":
        return 0
    return len(site.approximated_heads) if site.approximated_heads else (site.q_shape or (0, 1))[1]


@dataclass
class Run:
    name: str
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    compile_seconds: float = 0.0
    decisions: list[list[str]] = field(default_factory=list)  # per step, per site: method
    heads: list[list[int]] = field(default_factory=list)  # per step, per site: query heads approximated
    val_loss: float = math.nan
    backend: almostlinear.Backend | None = None

    def tokens_per_second(self, tokens_per_step: int) -> float:
        timed = self.step_seconds[1:] or self.step_seconds  # the first step includes compilation
        return tokens_per_step * len(timed) / max(sum(timed), 1e-9)

    def final_loss(self, last: int = 10) -> float:
        tail = self.losses[-last:]
        return sum(tail) / len(tail)


def validation_loss(compiled, data: torch.Tensor, seq_len: int, batch: int, n_batches: int, device: str) -> float:
    """Mean loss on fixed held-out batches, through the compiled model as trained (grad mode on, no backward:
    a no_grad call would compile a second, inference graph with its own decisions)."""
    losses = []
    for x, y in batches(data, seq_len, batch, n_batches, seed=12345):
        losses.append(float(compiled(x.to(device), y.to(device)).detach()))
    return sum(losses) / len(losses)


def train(name: str, config: GPTConfig, data: torch.Tensor, *, steps: int, batch: int, seed: int, lr: float,
          device: str, progress: bool = True, val_data: torch.Tensor | None = None, val_batches: int = 8,
          **options) -> Run:
    """Train one model from the same initialisation on the same batches; `options` go to the backend.
    With `val_data`, the final validation loss is measured on `val_batches` fixed batches after training."""
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

            bar = tqdm(total=steps, desc=f"{name:>10}", unit="step", leave=True)
        except ImportError:  # progress is a nicety; the run itself needs nothing extra
            bar = None
    for step, (x, y) in enumerate(iterator):
        x, y = x.to(device), y.to(device)
        loss, elapsed = timed_step(compiled, optimizer, x, y, device)
        if step == 0:
            run.compile_seconds = elapsed
        run.step_seconds.append(elapsed)
        run.losses.append(float(loss.detach()))
        report = backend.reports[-1] if backend.reports else None  # live: re-checks update its rows
        run.decisions.append([str(s.method) for s in report.sites] if report else [])
        run.heads.append([heads_approximated(s) for s in report.sites] if report else [])
        if bar is not None:
            bar.set_postfix(loss=f"{run.losses[-1]:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    if val_data is not None:
        run.val_loss = validation_loss(compiled, val_data, config.block_size, batch, val_batches, device)
    return run


def guarded_sites(report) -> tuple[int, int, int]:
    """(call, sites the guard ran exact, sites re-checked) at the last re-check: a site the run-time guard sends
    to exact attention on a call shows as approximated in the map (its plan) but computed softmax on that call."""
    last = max((h["call"] for h in report.history if "site" in h), default=0)
    checked = [h for h in report.history if "site" in h and h["call"] == last]
    return last, sum("ran exact on this call" in h["event"] for h in checked), len(checked)


def decision_changes(run: Run) -> list[str]:
    """The steps at which the approximated heads per site changed, as 'step N: 4/4/2/0' lines."""
    lines, previous = [], None
    for step, heads in enumerate(run.heads):
        if heads != previous:
            lines.append(f"step {step:>4}: heads approximated per site {'/'.join(map(str, heads)) or '-'}")
            previous = heads
    return lines


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(runs: dict[str, Run], n_heads: int, path: Path, title: str) -> str:
    if importlib.util.find_spec("matplotlib") is None:
        return "plot skipped: matplotlib is not installed (pip install matplotlib, or the [examples] extra)"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    auto = runs["auto"]
    fig, (ax_loss, ax_sites) = plt.subplots(2, 1, figsize=(8, 7.5), height_ratios=[3, 1.3])
    window = max(1, len(auto.losses) // 30)
    labels = {"exact": "exact attention (softmax)", "auto": "almostlinear auto (re-checks)",
              "polynomial": "polynomial attention from scratch", "window": "polynomial + exact window"}
    for name, run in runs.items():
        ax_loss.plot(smooth(run.losses, window), label=f"{labels[name]}: val {run.val_loss:.3f}",
                     alpha=0.9, lw=1.4 if name != "exact" else 2.2)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"training loss (nats/byte, mean of {window} steps)")
    ax_loss.set_title(title)
    ax_loss.legend()
    n_sites = max((len(h) for h in auto.heads), default=0)
    if n_sites:
        grid = torch.tensor([[c / n_heads for c in h] + [0.0] * (n_sites - len(h)) for h in auto.heads]).T
        ax_sites.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
        ax_sites.set_yticks(range(n_sites))
        ax_sites.set_yticklabels([s.module_path for s in auto.backend.reports[-1].sites])
    ax_sites.set_xlabel("step; auto's planned share of heads approximated per site (green: all polynomial, red: all "
                        "exact;\nthe run-time guard may still run a planned head exact on a call: see the re-checks)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return f"loss curves and auto's per-site decisions: {path}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128, help="context length (default 128)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128, help="model width (head dim = embd / heads)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--recheck-every", type=int, default=25)
    parser.add_argument("--min-seq-len", type=int, default=0,
                        help="key length below which sites stay exact (default 0: all eligible; see the docstring)")
    parser.add_argument("--exact-window", type=int, default=None,
                        help="the window run's exact window (default: a quarter of --seq-len)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of exact,auto,polynomial,window")
    parser.add_argument("--inner", choices=["inductor", "aot_eager", "eager"], default="aot_eager")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/train_gpt.png"))
    parser.add_argument("--context-parallel", type=int, default=0, metavar="RANKS",
                        help="train the polynomial run with each sequence split over RANKS ranks (spawned processes) "
                             "and compare its losses with the same run on one rank")
    args = parser.parse_args(argv)
    if args.embd % args.heads:
        parser.error(f"--embd {args.embd} must be divisible by --heads {args.heads}")
    methods = [m for m in args.methods.split(",") if m]
    if not methods or any(m not in METHODS for m in methods):
        parser.error(f"--methods {args.methods!r}: choose from {','.join(METHODS)}")

    train_data, val_data = split(stdlib_text())
    config = GPTConfig(vocab_size=256, block_size=args.seq_len, n_layer=args.layers, n_head=args.heads,
                       n_embd=args.embd, dropout=0.0)
    if args.context_parallel:
        return compare_context_parallel(args, config, train_data, val_data)
    common = dict(steps=args.steps, batch=args.batch, seed=args.seed, lr=args.lr, device=args.device,
                  inner=args.inner, min_seq_len=args.min_seq_len, val_data=val_data)
    print(f"char-level GPT: {args.layers} layers, {args.heads} heads of dim {args.embd // args.heads}, context "
          f"{args.seq_len}, batch {args.batch}, {args.steps} steps, lr {args.lr} on {len(train_data) / 1e6:.1f} MB "
          f"of stdlib source (validation: {len(val_data) / 1e6:.1f} MB held out); inner {args.inner}, device "
          f"{args.device}, torch {torch.__version__}")
    window = args.exact_window if args.exact_window is not None else args.seq_len // 4
    extra = {"exact": dict(method="exact"), "auto": dict(method="auto", budget=args.budget,
                                                          recheck_every=args.recheck_every),
             "polynomial": dict(method="polynomial", recheck_every=args.recheck_every, coefficients="taylor"),
             "window": dict(method="polynomial", recheck_every=args.recheck_every, exact_window=window,
                            coefficients="taylor")}
    runs = {m: train(m, config, train_data, **extra[m], **common) for m in methods}

    for name in ("auto", "polynomial", "window"):
        if name not in runs:
            continue
        print(f"\n=== {name}: the report at the end of training (per site and per head) ===")
        for report in runs[name].backend.reports:
            print(report)
        if name == "auto":
            print("auto's decisions over time:")
            print("\n".join("  " + line for line in decision_changes(runs[name])))
    tokens = args.batch * args.seq_len
    base = runs.get("exact")
    print()
    print(f"{'run':<11} {'tokens/s':>9} {'first step (compile) s':>23} {'train loss':>11} {'val loss':>9} "
          f"{'val vs exact':>12}  heads approximated per site (end)")
    for name, run in runs.items():
        versus = f"{100 * (run.val_loss - base.val_loss) / base.val_loss:+.2f}%" if base else "-"
        heads = "/".join(map(str, run.heads[-1])) if run.heads and run.heads[-1] else "-"
        print(f"{name:<11} {run.tokens_per_second(tokens):>9.0f} {run.compile_seconds:>23.1f} "
              f"{run.final_loss():>11.4f} {run.val_loss:>9.4f} {versus:>12}  {heads} (of {args.heads})")
    if "auto" in runs and runs["auto"].backend.reports:
        call, guarded, checked = guarded_sites(runs["auto"].backend.reports[-1])
        if checked:
            print(f"auto: at the last re-check (call {call}) the run-time guard ran {guarded} of the {checked} sites "
                  f"planned polynomial as exact attention (logit bounds over their planned limits)")
    for name in ("auto", "polynomial", "window"):
        if name in runs and runs[name].backend.reports and runs[name].backend.reports[-1].grad_error is not None:
            what = f"budget {args.budget:g}" if name == "auto" else "distance to softmax, information"
            report = runs[name].backend.reports[-1]
            print(f"{name}: last measured end-to-end gradient error {report.grad_error:.3g} at training call "
                  f"{report.grad_error_call} (0: at compile; {what})")
    if "auto" in runs:
        print(plot(runs, args.heads, args.out, f"char GPT {args.layers}x{args.heads} heads of "
                                                f"{args.embd // args.heads}, context {args.seq_len}, "
                                                f"budget {args.budget}"))


def _context_parallel_rank(rank: int, world: int, port: int, args, config: GPTConfig, queue) -> None:
    """One rank of the context-parallel run: the polynomial GPT on this rank's contiguous slice of every sequence
    (positions passed), the loss as the sum of the ranks' token losses over all tokens, the parameter gradients
    summed over the ranks (what DDP over the same ranks would do), the same AdamW steps on every rank."""
    import os

    import torch.distributed as dist
    import torch.nn.functional as F

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    try:
        train_data, val_data = split(stdlib_text())
        torch.manual_seed(args.seed)
        model = GPT(config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        compiled = almostlinear.context_parallel(model, method="polynomial", coefficients="taylor",
                                                 min_seq_len=args.min_seq_len, inner=args.inner)
        lengths = almostlinear.shard_lengths(args.seq_len, world)
        start = sum(lengths[:rank])
        mine = slice(start, start + lengths[rank])
        positions = torch.arange(start, start + lengths[rank], device=device)

        def loss_of(x, y):
            logits = compiled(x[:, mine].to(device), positions=positions)
            local = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, mine].reshape(-1).to(device),
                                    reduction="sum") / y.numel()
            total = local.detach().clone()
            dist.all_reduce(total)
            return local, float(total)

        losses, started = [], time.perf_counter()
        for x, y in batches(train_data, args.seq_len, args.batch, args.steps, args.seed):
            local, total = loss_of(x, y)
            optimizer.zero_grad(set_to_none=True)
            local.backward()
            grads = [p.grad for p in model.parameters()]
            flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce for every gradient
            dist.all_reduce(flat)
            for g, summed in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(summed)
            optimizer.step()
            losses.append(total)
        seconds = time.perf_counter() - started
        val = [loss_of(x, y)[1] for x, y in batches(val_data, args.seq_len, args.batch, 8, seed=12345)]
        if rank == 0:
            queue.put((losses, sum(val) / len(val), seconds, str(compiled.almostlinear_backend.reports[-1])))
    finally:
        dist.destroy_process_group()


def compare_context_parallel(args, config: GPTConfig, train_data, val_data) -> None:
    import socket

    import torch.multiprocessing as mp

    world = args.context_parallel
    print(f"polynomial GPT (Taylor), context {args.seq_len} split over {world} ranks "
          f"({almostlinear.shard_lengths(args.seq_len, world)} tokens), against the same run on one rank")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_context_parallel_rank, args=(r, world, port, args, config, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    losses, val, seconds, report = queue.get()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    one = train("polynomial", config, train_data, steps=args.steps, batch=args.batch, seed=args.seed, lr=args.lr,
                device=args.device, inner=args.inner, min_seq_len=args.min_seq_len, val_data=val_data,
                method="polynomial", coefficients="taylor", progress=False)
    print(report)
    print(f"{'step':>6} {'1 rank':>10} {f'{world} ranks':>10} {'difference':>11}")
    for step in sorted({0, 1, 2, args.steps - 1} | set(range(0, args.steps, max(1, args.steps // 8)))):
        print(f"{step:>6} {one.losses[step]:>10.5f} {losses[step]:>10.5f} {losses[step] - one.losses[step]:>+11.2e}")
    first = max(abs(a - b) for a, b in zip(one.losses[:10], losses[:10]))
    worst = max(abs(a - b) for a, b in zip(one.losses, losses))
    print(f"largest loss difference: {first:.2e} over the first 10 steps, {worst:.2e} over all {args.steps}; "
          f"validation loss 1 rank {one.val_loss:.5f}, {world} ranks {val:.5f} ({val - one.val_loss:+.2e}); "
          f"{world} ranks trained in {seconds:.0f} s, 1 rank in {sum(one.step_seconds):.0f} s")


if __name__ == "__main__":
    main()
