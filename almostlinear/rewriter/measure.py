"""Measuring a rewritten graph: one forward+backward with fixed cotangents, on copies, with the RNG preserved.

Gradient error of a graph f(inputs) -> outputs (docs/architecture.md): random cotangents u for the floating
outputs, g = VJP(f, u) w.r.t. every floating input that requires grad (parameters included; if none does,
all floating inputs), error = ||g_rewritten - g_reference|| / ||g_reference|| over the concatenation. The
reference is the graph with every site fused exact (equal to the original to fp32 round-off) so that
measuring never materialises n x n scores. At each approximate op node, SiteErrors also measures the op's
output against exact attention (the local error).

Measuring leaves no trace: inputs (parameters, buffers) are cloned, gradients are taken with
torch.autograd.grad (no .grad is touched), and the CPU/CUDA RNG states are restored; both runs start
from the same RNG state, so dropout draws are identical. Under torch.distributed, `agree` takes the maximum
over ranks of every number that decides.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx

from ..kernels import (drop_masked_keys, exact_attention, feature_rank, naive_poly_attention,
                       naive_window_attention)
from ..kernels.switchable import SWITCHABLE_OP, heads_in_mode, mixed_modes
from ..passes.graph_utils import concrete_int, rng_preserved
from ..passes.rewrite_polynomial import MIN_LEN_PREFIX

POLY_OP = torch.ops.almostlinear.poly_attention.default
WINDOW_OP = torch.ops.almostlinear.poly_window_attention.default
APPROXIMATE_OPS = (POLY_OP, WINDOW_OP, SWITCHABLE_OP)


@contextlib.contextmanager
def length_gates_open(work) -> Iterator[None]:
    """Sites of a dynamic length run the op only from min_seq_len on (a buffer per site, see
    passes/rewrite_polynomial.py); while planning measures, every gate is open, so the approximation is
    measured even on an example that is shorter than the crossover."""
    gates = {name: buf.clone() for name, buf in work.named_buffers() if name.startswith(MIN_LEN_PREFIX)}
    try:
        for name in gates:
            work.get_buffer(name).fill_(0)
        yield
    finally:
        for name, value in gates.items():
            work.get_buffer(name).copy_(value)


def finite_or_inf(value: float) -> float:
    """NaN is no error estimate: count it as an unbounded error."""
    return value if not math.isnan(value) else math.inf


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of `x` is finite: one reduction, no boolean copy (the max of |x| is NaN or inf exactly
    where some entry is)."""
    if x.numel() == 0 or not (x.is_floating_point() or x.is_complex()):
        return True
    return bool(torch.isfinite(x.abs().amax()))


def unusable_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why these q/k/v cannot calibrate or measure a site (None: they can).

    An empty batch (B = 0, or no queries or no keys) has no logits to bound; NaN or +-inf make the logit
    bound, the fit and every error meaningless (and crash the least-squares fit).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.numel() == 0:
            return f"empty batch ({name} has shape {tuple(x.shape)})"
    bad = [name for name, x in (("q", q), ("k", k), ("v", v)) if not all_finite(x)]
    if bad:
        return f"calibration inputs contain NaN/inf (in {', '.join(bad)})"
    return None


def real_inputs(example_inputs: Sequence[Any]) -> list[Any] | None:
    """Concrete copies of the example inputs (SymInts by their hints), or None if any is fake."""
    from torch._subclasses.fake_tensor import FakeTensor

    out = []
    for x in example_inputs:
        if isinstance(x, FakeTensor):
            return None
        if isinstance(x, torch.SymInt):
            x = concrete_int(x)
            if x is None:
                return None
        out.append(x)
    return out


def detached_clones(inputs: Sequence[Any]) -> list[Any]:
    """Detached copies of the tensor inputs: a graph that mutates its inputs (BatchNorm's running stats and
    num_batches_tracked, any in-place op on an input) then mutates the copies, never the caller's tensors."""
    return [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs]


def _grad_inputs(inputs: Sequence[Any]) -> tuple[list[Any], list[int]]:
    """Clones of the inputs; the floating ones that require grad get grads.

    If none does (a frozen model, or compiled under no_grad-free inference): the parameters, else every
    floating input. Not buffers where parameters exist: BatchNorm's running statistics are updated in place
    and are not differentiable, so a clone of them that requires grad fails the forward.
    """
    floating = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    wanted = ([i for i in floating if inputs[i].requires_grad]
              or [i for i in floating if isinstance(inputs[i], torch.nn.Parameter)]
              or floating)
    clones = []
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor):
            x = x.detach().clone()
            if i in wanted:
                x.requires_grad_(True)
        clones.append(x)
    return clones, wanted


def site_op_args(node: fx.Node):
    """(q, k, v, key_weight, alibi, scale, causal, window, switch-or-None) of an approximate op node."""
    if node.op != "call_function":
        return None
    if node.target is POLY_OP or node.target is WINDOW_OP:
        q, k, v, key_weight, alibi, scale, _, causal, window = node.args[:9]
        return q, k, v, key_weight, alibi, scale, causal, window, None
    if node.target is SWITCHABLE_OP:
        q, k, v, key_weight, alibi, switch, scale, _, causal, window = node.args[:10]
        return q, k, v, key_weight, alibi, scale, causal, window, switch
    return None


# Measuring runs the approximate op materialised (the [B, H, L, S] weights, by autograd) where that is cheaper
# than its features: the same function (kernels tested against this reference to ~1e-6), at short lengths
# several times faster (rank 2,145 features per token at d = 64 against 256 keys), and planning measures at the
# example's length, usually short. At most this many weights per op call.
MATERIALISE_MAX = 1 << 24


def materialised_op(target, args: tuple, kwargs: dict):
    """The outputs of an approximate op node computed by the naive reference (kernels/naive.py) with the op's
    semantics (zero-weight keys dropped, rows with no key 0), or None where the op is cheaper or the call is not
    one it can stand in for (degree from the coefficients; the state / logsumexp outputs are empty, read only by
    the op's own backward)."""
    exact_window = 0
    if target is POLY_OP or target is WINDOW_OP:
        q, k, v, key_weight, alibi, scale, coefficients, causal, window = args[:9]
        exact_window = (args[9] if len(args) > 9 else kwargs["exact_window"]) if target is WINDOW_OP else 0
        switch = None
    elif target is SWITCHABLE_OP:
        q, k, v, key_weight, alibi, switch, scale, coefficients, causal, window = args[:10]
        exact_window = args[10] if len(args) > 10 else kwargs.get("exact_window", 0)
    else:
        return None
    B, Hq, L, D = q.shape
    S = k.shape[2]
    if B * Hq * L * S > MATERIALISE_MAX or S >= feature_rank(D, len(coefficients) - 1):
        return None
    common = dict(scale=scale, causal=causal, key_weight=key_weight, window=window)

    def run(polynomial: bool, heads: tuple | None):  # heads: (query heads, key/value heads); None: all
        qh, kh, vh, slopes = q, k, v, alibi
        if heads is not None:
            qh, kh, vh = q.index_select(1, heads[0]), k.index_select(1, heads[1]), v.index_select(1, heads[1])
            slopes = None if alibi is None else alibi.index_select(0, heads[0])
        if not polynomial:
            return exact_attention(qh, kh, vh, alibi_slopes=slopes, **common)
        kh, vh = drop_masked_keys(kh, vh, key_weight)  # as the op (its exact branch does not)
        if exact_window:
            return naive_window_attention(qh, kh, vh, degree=len(coefficients) - 1, coefficients=list(coefficients),
                                          alibi_slopes=slopes, exact_window=exact_window, **common)
        return naive_poly_attention(qh, kh, vh, degree=len(coefficients) - 1, coefficients=list(coefficients),
                                    alibi_slopes=slopes, **common)

    if switch is None or not mixed_modes(switch):  # every head in one mode, as the op decides it
        out = run(switch is None or bool((switch != 0).any()), None)
    else:  # each head in its mode, as the switchable op computes them (no NaN of one branch in the other)
        on, off = heads_in_mode(switch, q, k, True), heads_in_mode(switch, q, k, False)
        out = torch.cat([run(True, on), run(False, off)], 1)
        out = out.index_select(1, torch.argsort(torch.cat([on[0], off[0]])))
    if target is WINDOW_OP:
        return out, *(q.new_empty(0, dtype=torch.float32) for _ in range(3))
    if switch is None:
        return out, q.new_empty(0, dtype=torch.float32)
    return out, switch.detach().clone(), q.new_zeros(B, Hq, L, dtype=torch.float32)


class SiteErrors(fx.Interpreter):
    """Runs a rewritten graph and, at each polynomial node, measures it against exact attention.

    Side-effect free when given detached_clones of the inputs: the module's own tensor attributes (buffers
    the graph reads with get_attr rather than as inputs) are read as copies too, so an in-place op on one
    changes the copy only. Parameters are read as they are (a forward does not mutate them).

    local_errors: NaN where the site's error cannot be measured on these inputs (empty, NaN/inf in q/k/v,
    or exact attention itself not finite), with the reason in `unmeasured`; inf where the approximation is
    not finite but exact attention is.
    """

    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, int] | None = None):
        super().__init__(gm)
        self.local_errors: dict[fx.Node, float] = {}
        self.head_errors: dict[fx.Node, list[float]] = {}  # per key/value head (its query heads together)
        self.unmeasured: dict[fx.Node, str] = {}
        self.ran_exact: set[fx.Node] = set()  # op nodes whose every head ran exact on this call (guard, crossover)
        self.watch = watch or {}
        self.captured: dict[fx.Node, torch.Tensor] = {}

    def call_function(self, target, args, kwargs) -> Any:
        if target in APPROXIMATE_OPS:
            fast = materialised_op(target, args, kwargs)
            if fast is not None:
                return fast
        return super().call_function(target, args, kwargs)

    def get_attr(self, target, args, kwargs) -> Any:
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            value = value.detach().clone()
        return value

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n in self.watch and isinstance(result, torch.Tensor):
            self.captured[n] = result.detach()
        args = site_op_args(n)
        if args is not None:
            q, k, v, key_weight, alibi, scale, causal, window, active = (
                self.env[a] if isinstance(a, fx.Node) else a for a in args
            )
            out = result[0] if isinstance(result, (tuple, list)) else result
            if active is None or bool(active.any()):
                self._measure(n, out, q, k, v, key_weight, alibi, scale, causal, window)
            else:  # the site ran exact on this call (switched, the guard, or its key length is below min_seq_len)
                self.local_errors[n] = math.nan
                self.ran_exact.add(n)
                self.unmeasured[n] = ("the site ran exact on this call (key length below min_seq_len, switched, or "
                                      "its logits left the planned range: the guard)")
        return result

    def _measure(self, n, out, q, k, v, key_weight, alibi, scale, causal, window) -> None:
        reason = unusable_reason(q, k, v)
        if reason is None:
            with torch.no_grad():
                exact = exact_attention(q.detach(), k.detach(), v.detach(), scale=scale, causal=causal,
                                        key_weight=key_weight, alibi_slopes=alibi, window=window).float()
                if not all_finite(exact):
                    reason = "exact attention is not finite on these inputs (NaN/inf)"
                else:
                    diff2 = ((out.detach().float() - exact) ** 2).sum((0, 2, 3))  # per query head
                    ref2 = (exact ** 2).sum((0, 2, 3))
                    self.local_errors[n] = finite_or_inf(float(diff2.sum().sqrt() / ref2.sum().sqrt().clamp_min(1e-30)))
                    groups = diff2.reshape(k.shape[1], -1).sum(1).sqrt() / ref2.reshape(k.shape[1], -1).sum(1).sqrt()
                    self.head_errors[n] = [finite_or_inf(float(e)) for e in groups]
                    return
        self.local_errors[n] = math.nan
        self.unmeasured[n] = reason


@dataclass
class Measurement:
    grads: list[torch.Tensor] = field(default_factory=list)
    local_errors: dict = field(default_factory=dict)
    captured: dict = field(default_factory=dict)
    unmeasured: dict = field(default_factory=dict)  # node -> why its local error is NaN
    head_errors: dict = field(default_factory=dict)  # node -> local error per key/value head
    outputs_finite: bool = True  # a forward-only run (no grads): whether its floating outputs are finite
    outputs: list = field(default_factory=list)  # the floating outputs, detached

    def finite(self) -> bool:
        """Whether every gradient is finite (else no gradient error can be measured against it); for a
        forward-only run, whether the outputs are."""
        return self.outputs_finite and all(all_finite(g) for g in self.grads)


def run_with_grads(gm: fx.GraphModule, inputs: Sequence[Any], rng_state: torch.Tensor,
                   watch: dict[fx.Node, int] | None = None, backward: bool = True,
                   rows: torch.Tensor | None = None) -> Measurement:
    """One forward+backward of `gm` on clones of `inputs` with fixed cotangents; no side effects (inputs and
    the module's buffers are cloned, so buffer updates such as BatchNorm's land on the clones).
    `backward=False`: the forward only (to capture `watch`), no gradients. `rows`: cotangents only on these rows
    (dim 0) of every output, the gradients of those rows alone (rewriter/holdout.py)."""
    clones, wanted = _grad_inputs(inputs)
    with rng_preserved(), torch.set_grad_enabled(backward):
        torch.set_rng_state(rng_state)
        interpreter = SiteErrors(gm, watch)
        floating = floating_outputs(interpreter.run(*clones))
        outputs_finite = backward or all(all_finite(o) for o in floating)
        flat = [o for o in floating if o.requires_grad]
        generator = torch.Generator(device="cpu").manual_seed(20240)
        cotangents = [torch.randn(o.shape, generator=generator, dtype=torch.float32).to(o) for o in flat]
        if rows is not None:
            cotangents = [c * _row_mask(c, rows) for c in cotangents]
        targets = [clones[i] for i in wanted]
        grads = torch.autograd.grad(flat, targets, cotangents, allow_unused=True) if flat and backward else []
    grads = [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(grads, targets)]
    return Measurement(grads, interpreter.local_errors, interpreter.captured, interpreter.unmeasured,
                       interpreter.head_errors, outputs_finite, [o.detach() for o in floating])


def floating_outputs(outputs: Any) -> list[torch.Tensor]:
    """A graph's floating tensor outputs (a single output or a tuple/list of them)."""
    flat = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    return [o for o in flat if isinstance(o, torch.Tensor) and o.is_floating_point()]


def _row_mask(c: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(c.shape[0], dtype=c.dtype, device=c.device)
    mask[rows.to(c.device)] = 1
    return mask.reshape(-1, *([1] * (c.dim() - 1)))


def agree(values: Sequence[float]) -> list[float]:
    """The element-wise maximum over all ranks when torch.distributed is initialized (else the values).

    Every decision is taken from agreed numbers, so no rank runs a different graph from the others.
    """
    import torch.distributed as dist

    values = [float(v) for v in values]
    if not values or not (dist.is_available() and dist.is_initialized()):
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([v if math.isfinite(v) else 1e300 for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [float(v) if v < 1e300 else math.inf for v in tensor.cpu()]


def summed(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over all ranks of a float64 tensor when torch.distributed is initialized (else the tensor): what
    a statistic over the union of the ranks' batches needs (the mass-weighted fit's normal equations)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = tensor.detach().to(device=device, dtype=torch.float64).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(tensor.device)


def gradient_error(grads: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """||g - g_ref|| / ||g_ref||; NaN when it cannot be measured (the reference is not finite), inf when
    only `grads` is not finite."""
    if not reference:
        return 0.0
    num = torch.sqrt(sum(((g.double() - r.double()) ** 2).sum() for g, r in zip(grads, reference)))
    den = torch.sqrt(sum((r.double() ** 2).sum() for r in reference))
    if not math.isfinite(float(den)):
        return math.nan
    if float(den) == 0.0:
        return 0.0 if float(num) == 0.0 else math.inf
    return finite_or_inf(float(num / den))
