"""Planning time: how long the backend takes, before the first step, to decide which attention it approximates.

    python benchmarks/planning.py                                   # measure_rows all vs 2; ~15 minutes, 1 thread
    python benchmarks/planning.py --hidden 384 --weights sharp      # one case
    python benchmarks/planning.py --rows all,4,2,1 --repeats 3

The case of issue 25: a 6-layer x 12-head encoder (Hugging Face BERT built from a config, random weights, nothing
downloaded; SDPA attention, a padded batch of 16 x 256 tokens, the last quarter of half the rows padded), one
thread, `Backend(method=..., min_seq_len=0, inner="aot_eager", measure_rows=...)`. Two widths: hidden 384 (head dim
32, the all-MiniLM-L6 shape) and 768 (head dim 64, BERT-base); two sets of weights: `random` (every head
near-uniform) and `sharp` (the query weights of heads 6-11 of every layer scaled by 2, 3, 4, 6, 8, 12, as after
training: some heads within budget, some near it, some far over it, so that the per-head fits run).

Each row is one compile, stopped after planning (the inner compiler and the first step are not timed). Planning is
`report.history[-1]["planning_seconds"]` (the budget search); the columns split it with timers around
rewriter/search.py's steps: the capture pass (the exact forward over the whole batch; with measure_rows=all also
its backward, the reference), the held-out rows' reference (the graph resized to them, checked, fwd+bwd:
rewriter/subbatch.py), calibration (rewriter/calibrate.py for every site), the measuring passes (one per back-off
step); the rest is applying the rewrites. `measure_rows=all` is planning as it was before the resized graph
(every held-out row, at the example's batch); the settings run interleaved in one process, `--repeats` rounds.
Decisions: sites approximated, and key/value heads approximated over all sites' heads.

"in eager steps": planning divided by one plain fwd+bwd of the same model, timed in the same rounds (the
machine-independent figure: issue 25 counted 39.5 s as about 40 training steps).

Prints a markdown table and writes it to benchmarks/results/planning.md (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import almostlinear  # noqa: E402
from almostlinear.rewriter import backend as backend_module  # noqa: E402
from almostlinear.rewriter import search, subbatch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARP = (1, 1, 1, 1, 1, 1, 2, 3, 4, 6, 8, 12)  # query-weight factor per head (12 heads)


def encoder(hidden: int, sharp: bool, layers: int = 6, heads: int = 12, batch: int = 16, seq: int = 256):
    """(model, input_ids, attention_mask): a BERT encoder from a config with seeded random weights."""
    import transformers as tf

    cfg = tf.BertConfig(num_hidden_layers=layers, num_attention_heads=heads, hidden_size=hidden,
                        intermediate_size=4 * hidden, vocab_size=1000, max_position_embeddings=512,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa",
                        use_cache=False)
    torch.manual_seed(0)
    model = tf.BertModel(cfg, add_pooling_layer=False)
    if sharp:
        d = hidden // heads
        with torch.no_grad():
            for layer in model.encoder.layer:
                weight = layer.attention.self.query.weight
                for h, factor in enumerate(SHARP[:heads]):
                    weight[h * d:(h + 1) * d] *= factor
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[batch // 2:, seq * 3 // 4:] = 0
    return model, ids, mask


class _Planned(Exception):
    """Raised at the hand-off to the inner compiler: planning is over, nothing more to time."""


class Timers:
    """Wall time of the search's steps: the capture pass (the exact forward over the whole batch, or its fwd+bwd
    where the error is measured at the example's batch), the held-out rows' reference (resizing, the check and the
    fwd+bwd of the exact graph on them: subbatch.sub_batch_sample), calibration, and the measuring passes."""

    STEPS = {"_reference": "capture", "sub_batch_sample": "rows reference", "_calibrate_all": "calibration",
             "_back_off": "measuring"}

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.passes = 0
        self.originals: dict = {}

    def install(self) -> None:
        for name, label in self.STEPS.items():
            self.originals[name] = getattr(search, name)
            setattr(search, name, self._timed(self.originals[name], label))
        self.originals["measure"] = measure = subbatch.Sample.measure

        def counted(sample, *args, **kwargs):
            self.passes += 1
            return measure(sample, *args, **kwargs)

        subbatch.Sample.measure = counted
        self.originals["hand_off"] = backend_module.hand_off

        def stop(*args, **kwargs):
            raise _Planned

        backend_module.hand_off = stop

    def uninstall(self) -> None:
        for name, fn in self.originals.items():
            if name == "measure":
                subbatch.Sample.measure = fn
            else:
                setattr(backend_module if name == "hand_off" else search, name, fn)

    def _timed(self, fn, label):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started
        return timed


def plan(model, ids, mask, method: str, rows: int | None) -> dict:
    """Compile once with `method` and `measure_rows=rows`, stop after planning; the row."""
    torch._dynamo.reset()
    timers = Timers()
    timers.install()
    backend = almostlinear.Backend(method=method, min_seq_len=0, inner="aot_eager", measure_rows=rows)
    try:
        torch.compile(model, backend=backend)(ids, attention_mask=mask)
        raise RuntimeError("the compile finished without reaching the hand-off: nothing was planned")
    except Exception as error:  # Dynamo wraps the backend's exception
        if not any(isinstance(e, _Planned) for e in _chain(error)):
            raise
    finally:
        timers.uninstall()
    report = backend.reports[-1]
    heads = model.config.num_attention_heads
    approximated = [s for s in report.sites if s.method == "polynomial"]
    n_heads = sum(heads if s.approximated_heads is None else len(s.approximated_heads) for s in approximated)
    return {"planning": report.history[-1].get("planning_seconds", float("nan")), "total": report.planning_seconds,
            **timers.seconds, "passes": timers.passes, "sites": f"{len(approximated)}/{len(report.sites)}",
            "heads": f"{n_heads}/{heads * len(report.sites)}", "grad_error": report.grad_error,
            "covers": report.grad_error_covers,
            "decisions": {s.id: (str(s.method), s.approximated_heads) for s in report.sites}}


def eager_step(model, ids, mask) -> float:
    """Seconds of one plain fwd+bwd of the model (no compile): the unit a planning time is worth."""
    started = time.perf_counter()
    model(ids, attention_mask=mask).last_hidden_state.square().mean().backward()
    seconds = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return seconds


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _decided(decision) -> str:
    """A site's decision in words: its method and the key/value heads it approximates."""
    if decision is None:
        return "absent"
    method, heads = decision
    return method if heads is None else f"{method} on heads {list(heads)}"


def _seconds(row: dict, key: str, missing: str = "n/a") -> str:
    return f"{row[key]:.1f}" if key in row else missing


def _rows(text: str) -> int | None:
    return None if text == "all" else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", default="384,768", help="encoder widths (12 heads each)")
    parser.add_argument("--weights", default="random,sharp", help="random and/or sharp")
    parser.add_argument("--methods", default="auto,polynomial")
    parser.add_argument("--rows", default="all,2", help="measure_rows values compared ('all': None)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; each round runs every --rows value in turn")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "planning.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = ("| encoder | weights | method | measure_rows | planning s, min (median) | in eager steps | capture s "
              "| rows reference s | calibration s | measuring s (passes) | sites approx. | kv heads approx. "
              "| grad error |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    changed, covers = [], {}
    for hidden in (int(h) for h in args.hidden.split(",")):
        for weights in args.weights.split(","):
            model, ids, mask = encoder(hidden, weights == "sharp")
            for method in args.methods.split(","):
                runs: dict[str, list[dict]] = {r: [] for r in args.rows.split(",")}
                steps = []
                for _ in range(args.repeats):  # interleaved: the machine's drift hits every setting alike
                    steps.append(eager_step(model, ids, mask))
                    for rows in runs:
                        runs[rows].append(plan(model, ids, mask, method, _rows(rows)))
                step = statistics.median(steps)
                for rows, results in runs.items():
                    best = min(results, key=lambda r: r["planning"])
                    median = statistics.median(r["planning"] for r in results)
                    covers[rows] = best["covers"]
                    line = (f"| 6 x 12 heads, hidden {hidden} (d {hidden // 12}), 16 x 256 | {weights} | {method} | "
                            f"{rows} | {best['planning']:.1f} ({median:.1f}) | {best['planning'] / step:.1f} | "
                            f"{_seconds(best, 'capture')} | {_seconds(best, 'rows reference', '-')} | "
                            f"{_seconds(best, 'calibration')} | {_seconds(best, 'measuring')} ({best['passes']}) | "
                            f"{best['sites']} | {best['heads']} | {best['grad_error']:.3g} |")
                    lines.append(line)
                    print(line, flush=True)
                first, *others = runs
                for rows in others:
                    a, b = runs[first][0]["decisions"], runs[rows][0]["decisions"]
                    changed += [f"hidden {hidden}, {weights}, {method}, site {sid}: {_decided(a.get(sid))} with "
                                f"measure_rows={first}, {_decided(b.get(sid))} with {rows}"
                                for sid in sorted(set(a) | set(b)) if a.get(sid) != b.get(sid)]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    notes = [f"{stamp}, {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
             f"`python benchmarks/planning.py {' '.join(sys.argv[1:])}`. Seconds are wall time of planning "
             f"(the budget search) in one compile each, {args.repeats} rounds with the settings interleaved in one "
             "process; the columns split the fastest run. \"in eager steps\": the fastest planning over the median "
             "of one plain fwd+bwd of the model, timed in the same rounds.",
             "What the figure covers: " + "; ".join(f"measure_rows={r}: {c}" for r, c in covers.items()),
             "Decisions that differ between the settings: " + ("; ".join(changed) if changed else "none.")]
    text = "# Planning time (issue 25, part 3)\n\n" + "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"
    print("\n" + "\n\n".join(notes))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
