"""Planning time: how long the backend takes, before the first step, to decide which attention it approximates.

    python benchmarks/planning.py                                   # after only; ~10 minutes on 2 busy cores
    python benchmarks/planning.py --before 64dbcbd                  # also the calibration of that revision,
                                                                    # interleaved in one process (~20 minutes)
    python benchmarks/planning.py --hidden 384 --weights sharp      # one case

The case of issue 25: a 6-layer x 12-head encoder (Hugging Face BERT built from a config, random weights, nothing
downloaded; SDPA attention, a padded batch of 16 x 256 tokens, the last quarter of half the rows padded), one
thread, `Backend(method=..., min_seq_len=0, inner="aot_eager")`. Two widths: hidden 384 (head dim 32, the
all-MiniLM-L6 shape) and 768 (head dim 64, BERT-base); two sets of weights: `random` (every head near-uniform) and
`sharp` (the query weights of heads 6-11 of every layer scaled by 2, 3, 4, 6, 8, 12, as after training: some heads
within budget, some near it, some far over it, so that the per-head fits run).

Each row is one compile, stopped after planning (the inner compiler and the first step are not timed). Planning is
`report.history[-1]["planning_seconds"]` (the budget search: reference pass, calibration, measuring passes);
the columns split it with timers around rewriter/search.py's steps (n/a where a step was renamed): the reference
(capture) pass, other fwd(+bwd) passes (the held-out rows' exact reference), calibration (rewriter/calibrate.py
for every site), the measuring passes (one per back-off step); the rest is applying the rewrites. "before" swaps
in the calibration module of the revision given with --before (rewriter/calibrate.py as committed there); both
run alternately in one process, so the machine's drift hits both alike. Decisions: sites approximated, and key/value
heads approximated over all sites' heads.

"in eager steps": planning divided by one plain fwd+bwd of the same model, timed just before it (the machine-
independent figure: issue 25 counted 39.5 s as about 40 training steps).

Prints a markdown table and writes it to benchmarks/results/planning.md (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import almostlinear  # noqa: E402
from almostlinear.rewriter import backend as backend_module  # noqa: E402
from almostlinear.rewriter import search  # noqa: E402

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


def calibrate_of(revision: str):
    """rewriter/calibrate.py as committed at `revision`, loaded as a module of the package (its relative imports
    resolve), for the 'before' rows."""
    source = subprocess.run(["git", "show", f"{revision}:almostlinear/rewriter/calibrate.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "calibrate_before.py"
    path.write_text(source)
    name = "almostlinear.rewriter._calibrate_before"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _Planned(Exception):
    """Raised at the hand-off to the inner compiler: planning is over, nothing more to time."""


class Timers:
    """Wall time of the search's steps: the reference (capture) pass, calibration, the measuring passes, and any
    other fwd(+bwd) pass (run_with_grads outside those steps: the held-out rows' exact reference)."""

    STEPS = {"_reference": "reference", "_calibrate_all": "calibration", "_back_off": "measuring"}

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.passes = 0
        self.step: str | None = None
        self.originals = {}

    def install(self) -> None:
        for name, label in self.STEPS.items():
            if hasattr(search, name):
                self.originals[name] = getattr(search, name)
                setattr(search, name, self._timed(self.originals[name], label))
        if hasattr(search, "run_with_grads"):
            self.originals["run_with_grads"] = run = search.run_with_grads

            def counted(*args, **kwargs):
                self.passes += self.step == "measuring"
                if self.step is not None:
                    return run(*args, **kwargs)
                started = time.perf_counter()
                try:
                    return run(*args, **kwargs)
                finally:
                    self._add("other passes", time.perf_counter() - started)

            search.run_with_grads = counted
        self.originals["hand_off"] = backend_module.hand_off

        def stop(*args, **kwargs):
            raise _Planned

        backend_module.hand_off = stop

    def uninstall(self) -> None:
        for name, fn in self.originals.items():
            setattr(backend_module if name == "hand_off" else search, name, fn)

    def _add(self, label: str, seconds: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds

    def _timed(self, fn, label):
        def timed(*args, **kwargs):
            self.step = label
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(label, time.perf_counter() - started)
                self.step = None
        return timed


def plan(model, ids, mask, method: str, calibrate) -> dict:
    """Compile once with `method` (and `calibrate` swapped into the search), stop after planning; the row."""
    torch._dynamo.reset()
    timers = Timers()
    timers.install()
    real_calibrate = search.calibrate
    search.calibrate = calibrate
    backend = almostlinear.Backend(method=method, min_seq_len=0, inner="aot_eager")
    try:
        torch.compile(model, backend=backend)(ids, attention_mask=mask)
        raise RuntimeError("the compile finished without reaching the hand-off: nothing was planned")
    except Exception as error:  # Dynamo wraps the backend's exception
        if not any(isinstance(e, _Planned) for e in _chain(error)):
            raise
    finally:
        search.calibrate = real_calibrate
        timers.uninstall()
    report = backend.reports[-1]
    heads = model.config.num_attention_heads
    approximated = [s for s in report.sites if s.method == "polynomial"]
    n_heads = sum(heads if s.approximated_heads is None else len(s.approximated_heads) for s in approximated)
    return {"planning": report.history[-1].get("planning_seconds", float("nan")), "total": report.planning_seconds,
            **timers.seconds, "passes": timers.passes, "sites": f"{len(approximated)}/{len(report.sites)}",
            "heads": f"{n_heads}/{heads * len(report.sites)}", "grad_error": report.grad_error,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", default="384,768", help="encoder widths (12 heads each)")
    parser.add_argument("--weights", default="random,sharp", help="random and/or sharp")
    parser.add_argument("--methods", default="auto,polynomial")
    parser.add_argument("--before", default=None, help="git revision whose calibration gives the 'before' rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "planning.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from almostlinear.rewriter import calibrate as after

    versions = [("after", after.calibrate)]
    if args.before:
        versions.insert(0, (f"before ({args.before})", calibrate_of(args.before).calibrate))
    header = ("| encoder | weights | method | calibration | planning s | in eager steps | reference s | other passes s "
              "| calibration s | measuring s (passes) | sites approx. | kv heads approx. | grad error |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    changed = []
    for hidden in (int(h) for h in args.hidden.split(",")):
        for weights in args.weights.split(","):
            model, ids, mask = encoder(hidden, weights == "sharp")
            for method in args.methods.split(","):
                rows = []
                for label, calibrate in versions:
                    step = eager_step(model, ids, mask)
                    row = plan(model, ids, mask, method, calibrate)
                    rows.append(row)
                    line = (f"| 6 x 12 heads, hidden {hidden} (d {hidden // 12}), 16 x 256 | {weights} | {method} | "
                            f"{label} | {row['planning']:.1f} | {row['planning'] / step:.1f} | "
                            f"{_seconds(row, 'reference')} | {_seconds(row, 'other passes', '0')} | "
                            f"{_seconds(row, 'calibration')} | {_seconds(row, 'measuring')} ({row['passes']}) | "
                            f"{row['sites']} | {row['heads']} | {row['grad_error']:.3g} |")
                    lines.append(line)
                    print(line, flush=True)
                if len(rows) == 2:
                    before, after_ = rows[0]["decisions"], rows[1]["decisions"]
                    changed += [f"hidden {hidden}, {weights}, {method}, site {sid}: {_decided(before.get(sid))} "
                                f"before, {_decided(after_.get(sid))} after"
                                for sid in sorted(set(before) | set(after_)) if before.get(sid) != after_.get(sid)]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    notes = [f"{stamp}, {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
             f"`python benchmarks/planning.py {' '.join(sys.argv[1:])}`. Seconds are wall time of one compile each "
             "(this machine's speed drifts; before/after ran alternately in one process)."]
    if args.before:
        notes.append("Decisions that differ between before and after: " + ("; ".join(changed) if changed else "none."))
    text = "# Planning time (issue 25, part 3)\n\n" + "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"
    print("\n" + "\n\n".join(notes))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
