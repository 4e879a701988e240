"""Backend options: one validated, immutable record. Every bad key or value names the valid choices."""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..kinds import Choice

METHODS = tuple(c.value for c in (Choice.AUTO, Choice.EXACT, Choice.POLYNOMIAL))
INNER_COMPILERS = ("inductor", "aot_eager", "eager")
SITE_CHOICES = tuple(c.value for c in (Choice.EXACT, Choice.POLYNOMIAL, Choice.SKIP))
DEGREES = (2, 4, 6)
ATTENTION_DROPOUT = ("keep", "remove")
COEFFICIENTS = ("fit", "taylor")


@dataclass(frozen=True)
class Options:
    """What the user may set, per model (per `Backend` / per `torch.compile(..., options=...)` call).

    budget        largest relative end-to-end gradient error allowed (a finite number > 0)
    method        "auto" (approximate where measured to fit the budget and faster), "exact" (never
                  approximate), "polynomial" (approximate every supported site, for experiments)
    inner         compiler the rewritten graph is handed to: "inductor", "aot_eager" or "eager"
    degree        polynomial degree for approximated sites (an int: 2, 4 or 6), or None to choose
    min_seq_len   key length below which approximation is not used (None: the measured crossover)
    sites         {module-path glob: "exact" | "polynomial" | "skip"} per-site overrides
    recheck_every re-measure the error every N calls of a training graph (0: never)
    attention_dropout  "keep": a site with dropout on its attention weights stays exact (the op has no dropout);
                  "remove" (method="polynomial" only): such sites are approximated and train without that dropout
                  (the report says so on each: the regularisation changed)
    coefficients  "fit": Taylor coefficients of exp, or a polynomial fitted to the planning batch's logits where that
                  measures >= 20% better there; "taylor": always Taylor (for training from scratch, where the
                  planning batch, the initialisation, says nothing about the logits the model will learn)
    exact_window  polynomial sites keep exact softmax weights on each query's W nearest keys (causal: the last W,
                  itself included; otherwise |i - j| < W), P(s) on the others, one normaliser (an int >= 0; 0: none;
                  self-attention sites only). method="polynomial" trains with it (the road from a softmax-trained
                  model to linear-time attention: README "Converting a trained model"); method="auto" tries it per
                  key/value head between the polynomial alone and exact attention
    guard         method="auto": a key/value head whose logit bound on a call leaves the planned range (the
                  planning batch's, times up to 1.5) runs exact attention on that call (rewriter/guard.py)
    measure_rows  planning measures the end-to-end error on at most this many held-out rows of the example batch,
                  run as a batch of their own (an int >= 1; None: every held-out row, at the example's batch). Fewer
                  rows plan faster (each is a forward+backward of the model) and predict other batches less
                  tightly (the run-time guard covers sharper ones; rewriter/subbatch.py)
    strict        raise instead of falling back to exact when the budget cannot be met
    context_parallel  None (off), True (the default process group) or a torch.distributed ProcessGroup: the model
                  runs on a sequence split across the group's ranks, each holding a contiguous shard of every
                  sequence (almostlinear.context_parallel); polynomial sites exchange fixed-size states, exact ones
                  all-gather keys and values; under `auto` no run-time guard (README "Context parallelism")

    Validated on construction (however constructed). Numbers are stored as Python numbers (a numpy
    integer or float is accepted where its value is valid) and `sites` as a read-only copy, so that
    changing the caller's dict afterwards changes nothing.
    """

    budget: float = 0.05
    method: Choice = Choice.AUTO
    inner: str = "inductor"
    degree: int | None = None
    min_seq_len: int | None = None
    sites: Mapping[str, str] = field(default_factory=dict)
    recheck_every: int = 0
    exact_window: int = 0
    coefficients: str = "fit"
    guard: bool = True
    measure_rows: int | None = 2
    attention_dropout: str = "keep"
    strict: bool = False
    context_parallel: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.sites, Mapping):  # a snapshot: later changes to the caller's dict do not leak in
            object.__setattr__(self, "sites", types.MappingProxyType(dict(self.sites)))
        self.validate()
        object.__setattr__(self, "budget", float(self.budget))
        object.__setattr__(self, "method", Choice(self.method))
        if self.sites:
            object.__setattr__(self, "sites", types.MappingProxyType({k: Choice(v) for k, v in self.sites.items()}))
        for name in ("degree", "min_seq_len", "recheck_every", "exact_window", "measure_rows"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, int(value))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None = None, **more: Any) -> "Options":
        if values is not None and not isinstance(values, Mapping):
            raise ValueError(f"almostlinear options must be a dict of option -> value, got {values!r}")
        merged = dict(values or {})
        merged.update(more)
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(merged) - set(valid), key=repr)
        if unknown:
            raise ValueError(f"unknown almostlinear option(s) {unknown}; valid options are {valid}")
        return cls(**merged)

    def validate(self) -> None:
        _check(
            _is_real(self.budget) and math.isfinite(self.budget) and self.budget > 0,
            f"budget must be a finite number > 0 (a relative gradient error such as 0.05; valid range: "
            f"0 < budget < inf), got {self.budget!r}",
        )
        _check(_is_str(self.method) and self.method in METHODS,
               f"method must be one of {list(METHODS)}, got {self.method!r}")
        _check(_is_str(self.inner) and self.inner in INNER_COMPILERS,
               f"inner must be one of {list(INNER_COMPILERS)}, got {self.inner!r}")
        _check(
            self.degree is None or (_is_int(self.degree) and self.degree in DEGREES),
            f"degree must be None (choose automatically) or one of the ints {list(DEGREES)}, got {self.degree!r}",
        )
        _check(
            self.min_seq_len is None or (_is_int(self.min_seq_len) and self.min_seq_len >= 0),
            f"min_seq_len must be None or an int >= 0, got {self.min_seq_len!r}",
        )
        _check(isinstance(self.sites, Mapping), f"sites must be a dict of glob -> {list(SITE_CHOICES)}, got {self.sites!r}")
        for pattern, choice in self.sites.items():
            _check(isinstance(pattern, str), f"sites keys must be module-path globs (str), got {pattern!r}")
            _check(
                _is_str(choice) and choice in SITE_CHOICES,
                f"sites[{pattern!r}] must be one of {list(SITE_CHOICES)}, got {choice!r}",
            )
        _check(
            _is_int(self.recheck_every) and self.recheck_every >= 0,
            f"recheck_every must be an int >= 0 (0 disables re-checks), got {self.recheck_every!r}",
        )
        _check(
            self.measure_rows is None or (_is_int(self.measure_rows) and self.measure_rows >= 1),
            f"measure_rows must be None (every held-out row) or an int >= 1, got {self.measure_rows!r}",
        )
        _check(
            _is_int(self.exact_window) and self.exact_window >= 0,
            f"exact_window must be an int >= 0 (the number of nearest keys kept exact; 0: none), got "
            f"{self.exact_window!r}",
        )
        _check(_is_str(self.coefficients) and self.coefficients in COEFFICIENTS,
               f"coefficients must be one of {list(COEFFICIENTS)}, got {self.coefficients!r}")
        _check(isinstance(self.strict, bool), f"strict must be True or False, got {self.strict!r}")
        _check(isinstance(self.guard, bool), f"guard must be True or False, got {self.guard!r}")
        _check(_is_str(self.attention_dropout) and self.attention_dropout in ATTENTION_DROPOUT,
               f"attention_dropout must be one of {list(ATTENTION_DROPOUT)}, got {self.attention_dropout!r}")
        _check_context_parallel(self)
        _check(self.attention_dropout == "keep" or self.method == Choice.POLYNOMIAL,
               f"attention_dropout='remove' changes how the model trains, so it is offered with "
               f"method='polynomial' only; got method={str(getattr(self.method, 'value', self.method))!r}")

    def __deepcopy__(self, memo: dict) -> "Options":
        return self  # immutable (a frozen record with a read-only `sites`)

    def as_dict(self) -> dict[str, Any]:
        """A plain dict of the options (`sites` as a new plain dict)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["sites"] = dict(self.sites)
        return d


def _check_context_parallel(options: Options) -> None:
    cp = options.context_parallel
    if cp is None or cp is False:
        return
    if cp is not True:
        import torch.distributed as dist

        _check(dist.is_available() and isinstance(cp, dist.ProcessGroup),
               f"context_parallel must be None, True (the default process group) or a torch.distributed "
               f"ProcessGroup, got {cp!r}")
    for name, off in (("recheck_every", 0), ("exact_window", 0)):
        _check(getattr(options, name) == off,
               f"context_parallel does not support {name}={getattr(options, name)!r} (valid with it: {off})")
    _check(options.degree in (None, 2), f"context_parallel exchanges degree-2 states; got degree={options.degree!r} "
                                        f"(valid with it: None or 2)")


def _is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool, not a float even if whole (2.0)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A real number (Python or numpy int or float), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
