"""Re-checks in training: every N-th call re-measures the approximated sites on that call's inputs.

The compiled graph reads one 0-d switch buffer per approximated site (see kernels/switchable.py). Every
`recheck_every`-th call made with grad enabled (a training call), after the call itself, one forward pass
of the rewritten graph runs with exact attention computed beside each still-approximated site; a site
whose relative output error now exceeds the budget is switched to exact for the following calls (no
recompile; forward and backward of one call always use the same mode). Local errors are not the whole
story (a small error before a layer whose softmax became sharp is amplified), so the end-to-end gradient
error on the call's inputs is then measured too (one fwd+bwd with the current modes, one all-exact), and
while it exceeds the budget the site with the largest local error is switched as well. The numbers are
agreed across ranks first. The report's history keeps every check. Under method="polynomial" (training with
polynomial attention) the checks measure and record the distance to softmax only; no site is switched.

A re-check leaves no trace but its decisions: every pass runs on copies of the inputs (the module's buffers
among them, so BatchNorm statistics are updated once per training call, as without re-checks) with the RNG
state restored. A site whose error cannot be measured on a call's inputs (NaN/inf in its q/k/v, or exact
attention not finite) is kept and the check noted; the end-to-end check is skipped when the exact gradients
are not finite.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ..kinds import Method
from ..passes.graph_utils import rng_preserved
from ..passes.rewrite_polynomial import switch_name
from .measure import SiteErrors, agree, detached_clones, gradient_error, run_with_grads
from .report import Report, log, query_heads_of


class Rechecker:
    def __init__(self, compiled: Callable, work: fx.GraphModule, report: Report, budget: float, every: int,
                 poly_nodes: dict[int, fx.Node], gate: bool = True):
        self.compiled, self.work, self.report = compiled, work, report
        self.budget, self.every = budget, every
        self.gate = gate  # False (method="polynomial"): measure and record only, never switch a site
        self.poly_nodes = dict(poly_nodes)
        self.switches = {sid: getattr(work, switch_name(sid)) for sid in poly_nodes}
        self.calls = 0
        self._boxed_call = getattr(compiled, "_boxed_call", False)  # call us the way the inner callable is called

    def __call__(self, *args: Any) -> Any:
        boxed = len(args) == 1 and isinstance(args[0], list)
        inputs = list(args[0]) if boxed else list(args)  # copied first: boxed callees clear their list
        out = self.compiled(*args)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls % self.every == 0 and self.active():
                self.recheck(inputs)
        return out

    def active(self) -> list[int]:
        return sorted(sid for sid, switch in self.switches.items() if bool(switch.any()))

    def recheck(self, inputs: Sequence[Any]) -> None:
        # On copies of the inputs: the graph may mutate them in place (BatchNorm's running stats and
        # num_batches_tracked are inputs of the captured graph); a re-check must not update them a second time.
        clones = detached_clones(inputs)
        with rng_preserved(), torch.no_grad():
            interpreter = SiteErrors(self.work)
            interpreter.run(*clones)
        ids = self.active()
        errors = agree([interpreter.local_errors.get(self.poly_nodes[sid], math.inf) for sid in ids])
        # NaN: not measurable on this call's inputs (on any rank: agree() returns inf there, so count the
        # ranks that could not measure as well)
        unmeasured = agree([1.0 if self.poly_nodes[sid] in interpreter.unmeasured else 0.0 for sid in ids])
        exact_now = agree([1.0 if self.poly_nodes[sid] in interpreter.ran_exact else 0.0 for sid in ids])
        measured: dict[int, float] = {}
        for sid, error, skip, ran_exact in zip(ids, errors, unmeasured, exact_now):
            if ran_exact:  # nothing approximate to measure: the run-time guard (or the crossover) chose exact
                self._record(sid, math.nan, False, "ran exact on this call: the run-time guard found every head's "
                                                   "logit bound over its limit (or the key length is below the "
                                                   "crossover)")
                continue
            if skip:
                why = interpreter.unmeasured.get(self.poly_nodes[sid], "not measurable on another rank")
                self._record(sid, math.nan, False, f"not measured: {why}")
                continue
            switch = self.switches[sid]
            # every rank switches the same heads and reports the same numbers
            head_errors = agree(interpreter.head_errors.get(self.poly_nodes[sid]) or [math.inf] * switch.numel())
            self._note_head_errors(sid, head_errors)
            over = self.gate and error > self.budget
            if over:
                self._switch_over_budget(sid, head_errors, f"measured error {error:.3g} > budget {self.budget:g}")
            self._record(sid, error, over, "local error")
            measured[sid] = error
        self._check_end_to_end(inputs, measured)

    def _switch_over_budget(self, sid: int, errors: list[float], why: str) -> None:
        """Switch the key/value heads whose own error (`errors`, agreed) is over budget; the whole site when that
        is every head still approximated (or the heads' errors are unknown)."""
        switch = self.switches[sid]
        on = [h for h in range(switch.numel()) if int(switch.reshape(-1)[h]) == 1]
        over = [h for h in on if errors[h] > self.budget]
        if switch.dim() == 0 or not over or len(over) == len(on):
            self._switch(sid, why)
            return
        switch[over] = 0
        self._mark(sid, f"key/value heads {over} switched to exact at call {self.calls}: {why} (their errors "
                        f"{', '.join(f'{errors[h]:.3g}' for h in over)})")
        log.warning("almostlinear: site %d heads %s switched to exact at call %d: %s", sid, over, self.calls, why)

    def _switch(self, sid: int, why: str) -> None:
        self.switches[sid].fill_(0)
        self._mark(sid, f"switched to exact at call {self.calls}: {why} (was polynomial)")
        log.warning("almostlinear: site %d switched to exact at call %d: %s", sid, self.calls, why)

    def _note_head_errors(self, sid: int, errors: list[float]) -> None:
        """The approximability map shows the latest measurement: each query head the op computed on this call
        gets the error of its key/value head measured now (`recheck_error`) and the call (`recheck_call`); the
        heads that ran exact keep their compile-time numbers."""
        for row in self.report.sites:
            if row.id != sid or not row.heads:
                continue
            query_heads = row.q_shape[1] if row.q_shape and isinstance(row.q_shape[1], int) else len(row.heads)
            groups = max(1, query_heads // max(1, len(errors)))
            for head in row.heads:
                kv = head["head"] // groups
                if head["approximated"] and kv < len(errors):
                    head["recheck_error"], head["recheck_call"] = errors[kv], self.calls

    def _mark(self, sid: int, reason: str) -> None:
        """The report row follows the switch: method, approximated heads, the map's flags, the reason."""
        switch = self.switches[sid].reshape(-1)
        for row in self.report.sites:
            if row.id != sid:
                continue
            query_heads = row.q_shape[1] if row.q_shape and isinstance(row.q_shape[1], int) else switch.numel()
            groups = max(1, query_heads // switch.numel())
            on = query_heads_of([h for h in range(switch.numel()) if int(switch[h]) == 1], groups)
            row.method = Method.POLYNOMIAL if on else Method.EXACT
            row.approximated_heads = on if on and len(on) < groups * switch.numel() else None
            for head in row.heads:
                if head["approximated"] and head["head"] not in on:
                    head["switched_at"] = self.calls  # the map shows the head as switched to exact, and when
                head["approximated"] = head["head"] in on
            row.reason = reason

    def _record(self, sid: int, error: float, over: bool, what: str) -> None:
        switch = self.switches[sid].reshape(-1)
        on = bool(switch.any())
        done = ("switched to exact" if not on else f"heads {switch.tolist()} (1: approximated)") if over else "kept"
        self.report.history.append({"call": self.calls, "site": sid, "measured_error": error,
                                    "decision": "polynomial" if on else "exact", "grad_error": error,
                                    "approximated": self.active(), "event": f"re-check site {sid} ({what}): {done}"})

    def _check_end_to_end(self, inputs: Sequence[Any], local: dict[int, float]) -> None:
        rng = torch.get_rng_state()
        while self.active():
            active = self.active()
            saved = {sid: self.switches[sid].clone() for sid in active}  # per-head switches keep their heads
            try:
                for sid in active:
                    self.switches[sid].fill_(0)
                reference = run_with_grads(self.work, inputs, rng)
            finally:  # the switches are live state of the compiled graph: restored whatever happens
                for sid in active:
                    self.switches[sid].copy_(saved[sid])
            if agree([0.0 if reference.finite() else 1.0])[0]:
                self.report.history.append({"call": self.calls, "grad_error": math.nan, "approximated": active,
                                            "event": "re-check end-to-end gradient error skipped: the exact "
                                                     "gradients contain NaN/inf on this call's inputs"})
                return
            current = run_with_grads(self.work, inputs, rng)
            error = agree([gradient_error(current.grads, reference.grads)])[0]
            self.report.grad_error, self.report.grad_error_call = error, self.calls
            self.report.history.append({"call": self.calls, "grad_error": error, "approximated": active,
                                        "event": "re-check end-to-end gradient error"})
            if error <= self.budget or not self.gate:
                return
            worst = max(active, key=lambda sid: local.get(sid, 0.0))
            self._switch(worst, f"end-to-end gradient error {error:.3g} > budget {self.budget:g}, largest local "
                                f"error {local.get(worst, 0.0):.3g}")
