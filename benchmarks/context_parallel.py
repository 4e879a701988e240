"""Context parallelism on CPU (gloo): a polynomial GPT over one sequence, on 1 rank and on 2 ranks that each hold
half of it.  Per configuration and total length: the training step time (fwd+bwd), the peak memory per rank during
the steps, the bytes each rank sends per layer (counted by the rewrite: the report's `sent_bytes`) against what
ring attention would send (its K/V shard, fp32), and the longest sequence whose step fits a per-rank memory cap.

    python benchmarks/context_parallel.py                       # ~15 min on 2 quiet cores
    python benchmarks/context_parallel.py --lengths 8192,16384 --memory-lengths 8192,16384 --rounds 1   # quick
    python benchmarks/context_parallel.py --from-json benchmarks/results/context_parallel.json   # tables again

Configurations: "1 rank x 2 threads" (the machine's two cores on one process), "1 rank x 1 thread" and
"2 ranks x 1 thread" (the same two cores as two ranks).  Every (configuration, length) runs in fresh processes;
the timing rounds alternate the configurations (the VM's speed drifts), and the table gives the minimum and the
median over rounds and steps.  Memory: the peak resident set during the steps (VmHWM, reset after the compile and
planning with /proc/self/clear_refs) minus the resident set before them, i.e. what the step itself needs; the
model, torch and compiled code are the same in every configuration.  The model: the example GPT with nanoGPT's
flash path (SDPA is_causal, no causal buffer), 2 layers, 2 heads of 32, width 64, batch 1, `method="polynomial"`,
Taylor coefficients, aot_eager, positions passed per shard.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"1x2": (1, 2), "1x1": (1, 1), "2x1": (2, 1)}  # name -> (ranks, threads per rank)
LABELS = {"1x2": "1 rank x 2 threads", "1x1": "1 rank x 1 thread", "2x1": "2 ranks x 1 thread"}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed planning memory back, so the peak below is the steps'
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak resident set) to the current resident set


def flash_gpt(length: int):
    """The example GPT with nanoGPT's flash path (`F.scaled_dot_product_attention(is_causal=True)`) instead of its
    [block_size, block_size] causal buffer (4 GiB at 32k tokens, and twice that while `tril` builds it, on every
    rank)."""
    import torch.nn.functional as F

    from almostlinear.zoo import GPT, GPTConfig
    from almostlinear.zoo.gpt import CausalSelfAttention

    class FlashAttention(CausalSelfAttention):
        def forward(self, x):
            B, T, C = x.shape
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                       for t in self.c_attn(x).split(self.n_embd, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    model = GPT(GPTConfig(vocab_size=96, block_size=1, n_layer=2, n_head=2, n_embd=64))  # (a 1 x 1 buffer)
    model.wpe = torch.nn.Embedding(length, 64)  # positions up to the total length
    model.config.block_size = length
    for block in model.h:
        attn = FlashAttention.__new__(FlashAttention)
        attn.__dict__.update(block.attn.__dict__)
        del attn._buffers["bias"]
        block.attn = attn
    return model


def worker(rank: int, world: int, length: int, threads: int, steps: int) -> dict:
    import almostlinear

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = flash_gpt(length)
    ids = torch.randint(0, 96, (1, length), generator=torch.Generator().manual_seed(1))
    options = dict(method="polynomial", min_seq_len=0, coefficients="taylor", inner="aot_eager")
    if world > 1:
        lengths = almostlinear.shard_lengths(length, world)
        start = sum(lengths[:rank])
        ids, positions = ids[:, start:start + lengths[rank]], torch.arange(start, start + lengths[rank])
        compiled = almostlinear.context_parallel(model, **options)
        backend = compiled.almostlinear_backend
    else:
        positions = torch.arange(length)
        backend = almostlinear.Backend(**options)
        compiled = torch.compile(model, backend=backend, dynamic=False)

    def step() -> float:
        started = time.perf_counter()
        compiled(ids, positions=positions).float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    first = step()  # compile and planning
    planning_mib = _rss_kib("VmHWM") / 1024
    _reset_peak()
    before = _rss_kib("VmRSS")
    times = [step() for _ in range(steps)]
    peak = _rss_kib("VmHWM")
    report = backend.reports[-1]
    return {"times": times, "first": first, "step_mib": (peak - before) / 1024, "peak_mib": peak / 1024,
            "planning_mib": planning_mib,
            "sent": [s.sent_bytes for s in report.sites], "shard": int(ids.shape[1]),
            "methods": [str(s.method) for s in report.sites]}


def _entry(rank, world, port, length, threads, steps, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    import torch.distributed as dist

    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, worker(rank, world, length, threads, steps)))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        queue.put((rank, repr(exc)))
        raise
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(config: str, length: int, steps: int) -> list[dict]:
    """One (configuration, length) in fresh processes: every rank's result."""
    import socket

    import torch.multiprocessing as mp

    world, threads = CONFIGS[config]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, world, port, length, threads, steps, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    while len(results) < world:
        try:
            rank, value = queue.get(timeout=5)
            results[rank] = value
        except Exception:  # noqa: BLE001 - queue.Empty: check that every rank is still alive
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"{config} at {length}: rank(s) {dead} died (exit codes "
                                   f"{[procs[r].exitcode for r in dead]}; -9: out of memory?)") from None
    for p in procs:
        p.join(60)
    bad = {r: v for r, v in results.items() if isinstance(v, str)}
    if bad:
        raise RuntimeError(f"{config} at {length}: {bad}")
    return [results[r] for r in range(world)]


def ring_bytes(shard: int, heads: int = 2, d: int = 32, itemsize: int = 4) -> int:
    """What ring attention sends per hop and layer: this rank's K and V shard (batch 1)."""
    return shard * heads * 2 * d * itemsize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384,32768", help="total lengths timed (comma-separated)")
    parser.add_argument("--memory-lengths", default="8192,16384,24576,32768,49152,65536",
                        help="total lengths whose step memory is measured (1x2 and 2x1)")
    parser.add_argument("--cap-mib", type=float, default=None,
                        help="per-rank step memory cap (default: the 1-rank step memory at the longest memory length "
                             "whose double is also measured)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/context_parallel")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-render the tables from a previous run's .json (no measuring)")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    memory_lengths = [int(x) for x in args.memory_lengths.split(",")]

    if args.from_json:
        raw = json.loads(args.from_json.read_text())
        timing = {tuple(k.split("@")): v for k, v in raw["timing"].items()}
        timing = {(c, int(n)): v for (c, n), v in timing.items()}
        memory = {(c, int(n)): v for (c, n), v in ((tuple(k.split("@")), v) for k, v in raw["memory"].items())}
        sent = {int(n): tuple(v) for n, v in raw["sent"].items()}
        lengths, memory_lengths = raw["lengths"], raw["memory_lengths"]
    else:
        timing, memory, sent = measure(args, lengths, memory_lengths)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({
            "lengths": lengths, "memory_lengths": memory_lengths, "sent": sent,
            "timing": {f"{c}@{n}": v for (c, n), v in timing.items()},
            "memory": {f"{c}@{n}": v for (c, n), v in memory.items()}}, indent=1))
    summarize(args, lengths, memory_lengths, timing, memory, sent)


def measure(args, lengths, memory_lengths):
    """Run every configuration: step times per (config, length), step memory per (config, length), and per length
    the (bytes sent, shard length) of a 2-rank site."""
    timing: dict = {}
    results: dict = {}
    for rnd in range(args.rounds):
        for n in lengths:
            for config in (CONFIGS if rnd % 2 == 0 else list(CONFIGS)[::-1]):
                ranks = run(config, n, args.steps)
                results[(config, n)] = ranks
                steps = [max(r["times"][i] for r in ranks) for i in range(args.steps)]  # the slowest rank's step
                timing.setdefault((config, n), []).extend(steps)
                print(f"round {rnd} {config} n={n}: this round min {min(steps):.3f} s, "
                      f"step memory {max(r['step_mib'] for r in ranks):.0f} MiB/rank", flush=True)
    memory: dict = {}
    for n in memory_lengths:
        for config in ("1x2", "2x1"):
            ranks = results.get((config, n)) or run(config, n, 1)
            results[(config, n)] = ranks
            memory[(config, n)] = max(r["step_mib"] for r in ranks)
            print(f"memory {config} n={n}: {memory[(config, n)]:.0f} MiB/rank", flush=True)
    sent = {n: (results[("2x1", n)][0]["sent"][0], results[("2x1", n)][0]["shard"])
            for n in sorted(set(lengths) | set(memory_lengths)) if ("2x1", n) in results}
    return timing, memory, sent


def longest_within(memory: dict, config: str, lengths: list[int], cap: float) -> float:
    """The total length at which the (piecewise linear) measured step memory of `config` reaches `cap`; the last
    measured length if it stays below (a lower bound)."""
    points = [(n, memory[(config, n)]) for n in lengths]
    if points[0][1] > cap:
        return 0.0
    for (n0, m0), (n1, m1) in zip(points, points[1:]):
        if m1 > cap:
            return n0 + (n1 - n0) * (cap - m0) / (m1 - m0)
    return float(points[-1][0])


def summarize(args, lengths, memory_lengths, timing, memory, sent) -> None:
    doubled = [n for n in memory_lengths if 2 * n in memory_lengths]
    cap = args.cap_mib or memory[("1x2", doubled[-1] if doubled else memory_lengths[len(memory_lengths) // 2])]
    longest = {c: longest_within(memory, c, memory_lengths, cap) for c in ("1x2", "2x1")}
    lines = ["# Context parallelism: polynomial GPT, 1 vs 2 ranks (CPU, gloo)", "",
             f"`python benchmarks/context_parallel.py {' '.join(sys.argv[1:])}`".replace("  ", " "), "",
             "## Step time (fwd+bwd, s; min (median) over rounds x steps; a step ends with the slowest rank)", "",
             "| total length | " + " | ".join(LABELS[c] for c in CONFIGS) + " | 2x1 vs 1x2 |",
             "|---|" + "---|" * (len(CONFIGS) + 1)]
    for n in lengths:
        cells = [f"{min(timing[(c, n)]):.3f} ({statistics.median(timing[(c, n)]):.3f})" for c in CONFIGS]
        speed = min(timing[("1x2", n)]) / min(timing[("2x1", n)])
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {speed:.2f}x |")
    lines += ["", "## Bytes each rank sends per layer and step (forward; the backward's reduce-scatter sends the same)",
              "", "| total length | shard | state (counted, 2 ranks) | ring attention K/V per hop (fp32) | ratio |",
              "|---|---|---|---|---|"]
    for n, (state, shard) in sorted(sent.items()):
        lines.append(f"| {n} | {shard} | {state / 1e6:.3f} MB | {ring_bytes(shard) / 1e6:.3f} MB | "
                     f"{ring_bytes(shard) / state:.1f}x |")
    lines += ["", f"## Step memory per rank (MiB above the resident set before the steps); cap {cap:.0f} MiB", "",
              "| total length | 1 rank | 2 ranks (per rank) |", "|---|---|---|"]
    for n in memory_lengths:
        lines.append(f"| {n} | {memory[('1x2', n)]:.0f} | {memory[('2x1', n)]:.0f} |")
    ratio = longest["2x1"] / longest["1x2"] if longest["1x2"] else float("inf")
    lines += ["", f"Longest total length whose step fits {cap:.0f} MiB per rank (the measured memory, linear between "
              f"the measured lengths): 1 rank {longest['1x2']:.0f}, 2 ranks {longest['2x1']:.0f} ({ratio:.2f}x)."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for c in ("1x2", "2x1"):
            ax.plot(memory_lengths, [memory[(c, n)] for n in memory_lengths], "o-", label=LABELS[c])
        ax.axhline(cap, color="grey", ls="--", label=f"cap {cap:.0f} MiB")
        ax.set_xlabel("total sequence length")
        ax.set_ylabel("step memory per rank (MiB)")
        ax.set_title("polynomial GPT, context parallel over ranks")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
