"""What each rank runs (in a spawned process, gloo initialized), and the single-process references.

All scenarios run in one pair of processes (spawning costs more than a scenario here); each one is isolated
by torch._dynamo.reset() and reports an error string instead of raising, so one failing mode does not hide
the others. Every scenario ends with assert_same_decisions (a collective) and returns this rank's decision
signature, the graphs the backend saw and the gradients after one step.
"""
from __future__ import annotations

import contextlib
import traceback

import torch
import torch.nn.functional as F

T = 64
EXACT = {"method": "exact", "inner": "aot_eager"}
POLY = {"method": "polynomial", "min_seq_len": 0, "inner": "aot_eager"}
AUTO = {"method": "auto", "min_seq_len": 0, "inner": "aot_eager"}
SKEW = 8.0  # rank 1's temperature on the attention input: logits grow ~64x


def make_model(scaled: bool = False):
    from almostlinear.zoo.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(block_size=T, n_layer=2, n_head=2, n_embd=32)
    return ScaledGPT(config) if scaled else GPT(config)


def _scaled_gpt_class():
    from almostlinear.zoo.gpt import GPT

    class ScaledGPT(GPT):
        """The example GPT with a per-batch temperature on the attention input (a graph input, not a
        parameter or buffer, so DDP does not broadcast it and each rank may send its own)."""

        def forward(self, idx, targets, temperature):
            pos = torch.arange(idx.size(1), device=idx.device)
            x = self.drop(self.wte(idx) + self.wpe(pos))
            for block in self.h:
                x = x + block.attn(block.ln_1(x) * temperature)
                x = x + block.mlp(block.ln_2(x))
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return ScaledGPT


def ScaledGPT(config):  # noqa: N802 - a class built lazily (almostlinear.zoo.gpt is imported in the worker)
    return _scaled_gpt_class()(config)


def batch(rank: int) -> torch.Tensor:
    return torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(100 + rank))


def temperature(rank: int, skew: float | bool) -> torch.Tensor:
    factor = (SKEW if skew is True else float(skew)) if skew else 1.0
    return torch.full((1,), factor if rank == 1 else 1.0)


def signature(reports) -> list:
    from almostlinear.rewriter.distributed import decision_signature

    return decision_signature(reports)


def sites(reports) -> list:
    return [(s.module_path, s.method, s.mask_kind) for r in reports for s in r.sites]


def near_misses(reports) -> list:
    return [(s.module_path, s.reason) for r in reports for s in r.near_misses]


def grads_of(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()  # FSDP2: a collective, same order on every rank
        out[name] = None if g is None else g.detach().clone()
    return out


@contextlib.contextmanager
def first_bucket_bytes(n: int | None):
    """torch 2.13's DDPOptimizer asserts its first bucket (1 MiB) <= bucket_cap: lower it to split a tiny model."""
    import torch.distributed as dist

    before = dist._DEFAULT_FIRST_BUCKET_BYTES
    if n is not None:
        dist._DEFAULT_FIRST_BUCKET_BYTES = n
    try:
        yield
    finally:
        dist._DEFAULT_FIRST_BUCKET_BYTES = before


@contextlib.contextmanager
def prefer_fitted(on: bool):
    """Make calibration prefer the fitted polynomial whenever one exists (it rarely wins at init), so that
    the coefficients depend on the logit range, which differs per rank."""
    if not on:
        yield
        return
    from almostlinear.kernels import taylor_coefficients
    from almostlinear.rewriter import calibrate

    real = calibrate.candidate_error

    def patched(sample, coefficients):
        error = real(sample, coefficients)
        taylor = list(taylor_coefficients(len(coefficients) - 1))
        return error if list(coefficients) == taylor else 0.0

    calibrate.candidate_error = patched
    try:
        yield
    finally:
        calibrate.candidate_error = real


class _Spy:
    """Wraps a backend: records (nodes, fake inputs?, DDPOptimizer piece?) of every graph it is given."""

    def __init__(self, backend):
        self.backend, self.graphs = backend, []

    def __call__(self, gm, example_inputs, **kwargs):
        from torch._subclasses.fake_tensor import FakeTensor

        from almostlinear.rewriter.distributed import is_ddp_piece

        self.graphs.append({"nodes": len(gm.graph.nodes), "fake": any(isinstance(x, FakeTensor) for x in example_inputs),
                            "piece": is_ddp_piece(gm)})
        return self.backend(gm, example_inputs, **kwargs)


def _ddp(rank, options, mode=True, order="ddp(compile)", bucket_cap_mb=25.0, first_bucket=None, helper=False,
         scaled=False, skew=False, fitted=False):
    import almostlinear
    from almostlinear.rewriter import distributed as ald
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model(scaled)
    backend = ald.DistributedBackend(**options) if helper else almostlinear.Backend(**options)
    spy = _Spy(backend)
    args = (batch(rank), batch(rank)) + ((temperature(rank, skew),) if scaled else ())
    with torch._dynamo.config.patch(optimize_ddp=mode), first_bucket_bytes(first_bucket), prefer_fitted(fitted):
        if helper:
            compile_ = lambda m: ald.compile_for_ddp(m, backend=spy)  # noqa: E731
        else:
            compile_ = lambda m: torch.compile(m, backend=spy)  # noqa: E731
        if order == "ddp(compile)":
            wrapped = DDP(compile_(model), bucket_cap_mb=bucket_cap_mb)
        else:
            wrapped = compile_(DDP(model, bucket_cap_mb=bucket_cap_mb))
        loss = wrapped(*args)
        loss.backward()
    return backend, spy, model, float(loss.detach())


def _fsdp2(rank, options):
    import almostlinear
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for block in model.h:
        fully_shard(block)
    fully_shard(model)
    backend = almostlinear.Backend(**options)
    spy = _Spy(backend)
    loss = torch.compile(model, backend=spy)(batch(rank), batch(rank))
    loss.backward()
    return backend, spy, model, float(loss.detach())


def _recheck(rank, options):
    """Re-checks under DDP (helper, rewritten graph split into bucket pieces): call 1 on tame data keeps the
    polynomial sites; call 2, where only rank 1's logits explode, must switch both sites on both ranks; call 3
    must then compute exact attention (the pieces read the switch buffers the re-check flipped)."""
    from almostlinear.rewriter import distributed as ald
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model(scaled=True)
    backend = ald.DistributedBackend(**options)
    spy = _Spy(backend)
    wrapped = DDP(ald.compile_for_ddp(model, backend=spy), bucket_cap_mb=0.01)
    tame = (batch(rank), batch(rank), temperature(rank, False))
    wrapped(*tame).backward()
    before = [s.method for r in backend.reports for s in r.sites]
    wrapped(batch(rank), batch(rank), temperature(rank, True)).backward()
    after = [s.method for r in backend.reports for s in r.sites]
    loss = wrapped(*tame)
    loss.backward()
    with torch.no_grad():
        eager = model(*tame)
    backend.extra = {"before": before, "after": after, "loss_vs_eager": abs(float(loss.detach()) - float(eager)),
                     "graphs_compiled": len(backend.reports)}
    return backend, spy, model, float(loss.detach())


def _hf_recheck_split(rank, options):
    """compile_for_ddp on HF GPT-2 with re-check switches: the rewritten graph is split at DDP's buckets, and
    AOTAutograd needs a source for the rewrite's own buffers in every piece (it failed at compile before)."""
    from almostlinear.rewriter import distributed as ald
    from almostlinear.zoo import build
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model, ids, _ = build("gpt2", layers=2, seq_len=32)
    backend = ald.DistributedBackend(**options)
    spy = _Spy(backend)
    loss = DDP(ald.compile_for_ddp(model, backend=spy), bucket_cap_mb=0.01)(ids, labels=ids).loss
    loss.backward()
    return backend, spy, model, float(loss.detach())


SCENARIOS = {
    # name: (runner, kwargs)
    "ddp_default_exact": (_ddp, {"options": EXACT}),
    "ddp_default_poly": (_ddp, {"options": POLY}),
    "ddp_noopt_poly": (_ddp, {"options": POLY, "mode": False, "order": "compile(ddp)"}),
    "ddp_split_plain_exact": (_ddp, {"options": EXACT, "bucket_cap_mb": 0.01, "first_bucket": 1024}),
    "ddp_split_helper_poly": (_ddp, {"options": POLY, "bucket_cap_mb": 0.01, "helper": True}),
    "skew_auto": (_ddp, {"options": AUTO, "scaled": True, "skew": True, "mode": False}),
    "skew_poly_fitted": (_ddp, {"options": POLY, "scaled": True, "skew": 2.0, "mode": False, "fitted": True}),
    "recheck": (_recheck, {"options": dict(AUTO, recheck_every=1, guard=False)}),  # the re-check switches
    "hf_recheck_split": (_hf_recheck_split, {"options": dict(POLY, recheck_every=1)}),
    "fsdp2_exact": (_fsdp2, {"options": EXACT}),
    "fsdp2_poly": (_fsdp2, {"options": POLY}),
}


def suite(rank: int, world: int, names: list[str]) -> dict:
    from almostlinear.rewriter.distributed import assert_same_decisions

    results = {}
    for name in names:
        runner, kwargs = SCENARIOS[name]
        torch._dynamo.reset()
        result = {"error": None}
        try:
            backend, spy, model, loss = runner(rank, **kwargs)
            result.update(loss=loss, grads=grads_of(model), graphs=spy.graphs, sites=sites(backend.reports),
                          near_misses=near_misses(backend.reports), signature=signature(backend.reports),
                          ddp_pieces=[r.ddp_pieces for r in backend.reports],
                          extra=getattr(backend, "extra", None))
            try:
                assert_same_decisions(backend)
                result["agreed"] = True
            except RuntimeError as exc:
                result["agreed"] = str(exc)
        except Exception:  # noqa: BLE001 - reported to the parent, which fails that scenario's test
            result["error"] = traceback.format_exc()[-3000:]
        results[name] = result
    torch._dynamo.reset()
    return results


def reference(options: dict, ranks: list[int], scaled: bool = False, skew: bool = False) -> dict:
    """One process (no torch.distributed), the ranks' batches concatenated; loss = mean = DDP's average."""
    import almostlinear

    torch._dynamo.reset()
    model = make_model(scaled)
    backend = almostlinear.Backend(**options)
    tokens = torch.cat([batch(r) for r in ranks])
    args = (tokens, tokens)
    if scaled:
        temps = torch.cat([temperature(r, skew).expand(2) for r in ranks]).view(-1, 1, 1)
        args = args + (temps,)
    loss = torch.compile(model, backend=backend)(*args)
    loss.backward()
    out = {"loss": float(loss.detach()), "grads": grads_of(model), "signature": signature(backend.reports),
           "sites": sites(backend.reports)}
    torch._dynamo.reset()
    return out
