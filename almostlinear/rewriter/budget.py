"""The error budget: calibrate approximable sites, measure the end-to-end gradient error, back off.

Gradient error of a graph f(inputs) -> outputs (DESIGN.md): random cotangents u for the floating outputs,
g = VJP(f, u) w.r.t. every floating input that requires grad (parameters included; if none does, all
floating inputs), error = ||g_rewritten - g_reference|| / ||g_reference|| over the concatenation. The
reference is the graph with every site rewritten to fused exact attention (equal to the original to fp32
round-off, see the exact-mode oracle) so that measuring never materialises n x n scores.

Measuring leaves no trace: inputs (parameters, buffers) are cloned, gradients are taken with
torch.autograd.grad (no .grad is touched), and the CPU/CUDA RNG states are restored; both runs start
from the same RNG state, so dropout draws are identical.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx

from ..kernels import exact_attention, taylor_coefficients, validate_polynomial
from ..kernels.op import allowed_keys
from ..passes.graph_utils import concrete_int

from ..kernels.switchable import SWITCHABLE_OP

POLY_OP = torch.ops.almostlinear.poly_attention.default


class BudgetError(RuntimeError):
    """strict=True and the budget cannot be met with the approximation."""


# ---------------------------------------------------------------------------------------------------
# Polynomial error on a logit range (the paper's B)
# ---------------------------------------------------------------------------------------------------


def relative_error(coefficients: Sequence[float], bound: float, points: int = 2001) -> float:
    """eps = max over s in [-B, B] of |P(s) - exp(s)| / exp(s) (inf where exp overflows float64, or B is not
    a finite number)."""
    if not math.isfinite(bound) or bound > 600:
        return math.inf
    s = torch.linspace(-bound, bound, points, dtype=torch.float64)
    p = torch.zeros_like(s)
    for c in reversed(list(coefficients)):
        p = p * s + c
    return float(((p - s.exp()).abs() / s.exp()).max())


def fitted_coefficients(degree: int, bound: float) -> tuple[float, ...] | None:
    """A positive polynomial fitted to exp on [-B, B] (least squares of the relative error), or None.

    None too where no fit exists: B not a finite number > 0, or a basis that overflows float64 (B > ~700).
    """
    if not (math.isfinite(bound) and 0 < bound <= 600):
        return None
    s = torch.linspace(-bound, bound, 801, dtype=torch.float64)
    basis = torch.stack([s**j * torch.exp(-s) for j in range(degree + 1)], dim=1)
    if not bool(torch.isfinite(basis).all()):
        return None
    coeffs = torch.linalg.lstsq(basis, torch.ones_like(s).unsqueeze(1)).solution.squeeze(1)
    try:
        return validate_polynomial(degree, [float(c) for c in coeffs])
    except ValueError:
        return None


def paper_degree(bound: float, budget: float, max_degree: int = 64) -> int:
    """Smallest even Taylor degree whose relative error bound 2 eps / (1 - eps) fits the budget."""
    for degree in range(2, max_degree + 1, 2):
        eps = relative_error(taylor_coefficients(degree), bound)
        if eps < 1 and 2 * eps / (1 - eps) <= budget:
            return degree
    return max_degree


@dataclass
class Calibration:
    sampled_error: float  # relative output error of the op vs exact on sampled queries (all their keys)
    logit_bound: float  # B: max |scale * q.k| on a sample of the example inputs
    eps: float
    predicted_error: float  # 2 eps / (1 - eps) * max|V|
    predicted_relative: float  # 2 eps / (1 - eps)
    paper_degree: int
    degree: int
    coefficients: tuple[float, ...]
    fitted: bool


def _poly(s: torch.Tensor, coefficients: Sequence[float]) -> torch.Tensor:
    out = torch.zeros_like(s)
    for c in reversed(list(coefficients)):
        out = out * s + c
    return out


def unusable_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why these q/k/v cannot calibrate or measure a site (None: they can).

    An empty batch (B = 0, or no queries or no keys) has no logits to bound; NaN or +-inf make the logit
    bound, the fit and every error meaningless (and crash the least-squares fit).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.numel() == 0:
            return f"empty batch ({name} has shape {tuple(x.shape)})"
    bad = [name for name, x in (("q", q), ("k", k), ("v", v)) if not bool(torch.isfinite(x).all())]
    if bad:
        return f"calibration inputs contain NaN/inf (in {', '.join(bad)})"
    return None


def _finite_or_inf(value: float) -> float:
    """NaN is no error estimate: count it as an unbounded error."""
    return value if not math.isnan(value) else math.inf


def sampled_output_error(q, k, v, scale: float, coefficients: Sequence[float], causal: bool, window: int,
                         index: torch.Tensor, key_weight: torch.Tensor | None = None,
                         alibi_slopes: torch.Tensor | None = None) -> float:
    """||A_poly V - A_exp V|| / ||A_exp V|| for the sampled queries against all their keys (no n x n), with
    the site's masks: causal/window, the per-key weight [B, S] and ALiBi slopes [Hq] (the op's semantics).
    Rows with no allowed key are left out (both sides are undefined there).

    inf where it is not a number (logits that overflow float32 make both sides NaN).
    """
    qs = q.index_select(-2, index).float()
    logits = scale * (qs @ k.float().transpose(-2, -1))  # [B, H, m, S]
    S = k.shape[-2]
    allowed = allowed_keys(index.reshape(-1, 1), S, causal, window).expand_as(logits)
    bias = torch.zeros_like(logits)
    if key_weight is not None:
        kw = key_weight.float().reshape(key_weight.shape[0], 1, 1, S)
        allowed = allowed & (kw > 0)
        bias = bias + torch.log(kw.clamp_min(1e-38))
    if alibi_slopes is not None:
        j = torch.arange(S, device=q.device, dtype=torch.float32)
        i = index.to(torch.float32).reshape(-1, 1)
        bias = bias + alibi_slopes.float().reshape(1, -1, 1, 1) * (j - i)
    rows = allowed.any(-1, keepdim=True)
    allowed = allowed & rows
    bias = bias.masked_fill(~allowed, float("-inf"))
    exact = torch.softmax(torch.where(rows, logits + bias, 0.0), dim=-1) * rows
    shift = torch.where(rows, bias.amax(-1, keepdim=True), 0.0)
    weights = _poly(logits, coefficients) * torch.exp(bias - shift) * allowed
    poly = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
    vf = v.float()
    reference = exact @ vf
    return _finite_or_inf(float((poly @ vf - reference).norm() / reference.norm().clamp_min(1e-30)))


class CalibrationInputError(ValueError):
    """The example inputs of a site cannot calibrate it (empty, NaN/inf); the message says why."""


def calibrate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, degree: int, budget: float,
              causal: bool = False, window: int = 0, sample: int = 128, key_weight: torch.Tensor | None = None,
              alibi_slopes: torch.Tensor | None = None) -> Calibration:
    """Logit range and measured error on sampled queries, the polynomial's error bound, the degrees.

    q [B, Hq, L, D], k/v [B, Hk, S, D] (GQA groups are repeated here, on the sample only), key_weight
    [B, S] and alibi_slopes [Hq] as the op takes them (the sampled error is that of the masked site). Raises
    CalibrationInputError on inputs it cannot use (see unusable_reason); planning checks first.
    """
    reason = unusable_reason(q, k, v)
    if reason is not None:
        raise CalibrationInputError(reason)
    generator = torch.Generator(device="cpu").manual_seed(0)
    L = q.shape[-2]
    index = torch.randperm(L, generator=generator)[:sample].sort().values.to(q.device)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    logits = scale * (q.index_select(-2, index).float() @ k.float().transpose(-2, -1))
    # Under torch.distributed every number that chooses the polynomial is agreed (MAX over ranks), so all
    # ranks fit on the same logit range and pick the same coefficients: no rank runs a different graph.
    bound = agree([max(float(logits.abs().max()), 1e-6)])[0]  # finite inputs, but float32 may overflow: inf
    taylor = taylor_coefficients(degree)
    eps = relative_error(taylor, bound)
    coefficients, fitted = taylor, False
    candidate = fitted_coefficients(degree, bound)
    sampled = sampled_output_error(q, k, v, scale, taylor, causal, window, index, key_weight, alibi_slopes)
    sampled_fit = math.inf
    if candidate is not None:
        sampled_fit = sampled_output_error(q, k, v, scale, candidate, causal, window, index, key_weight,
                                           alibi_slopes)
    sampled, sampled_fit = agree([sampled, sampled_fit])
    if candidate is not None and sampled_fit < 0.8 * sampled:
        candidate = tuple(agree(candidate))  # bit-identical on every rank even if lstsq differs in the last ulp
        coefficients, fitted, sampled = candidate, True, sampled_fit
        eps = relative_error(candidate, bound)
    relative = 2 * eps / (1 - eps) if eps < 1 else math.inf
    return Calibration(
        sampled_error=sampled,
        logit_bound=bound,
        eps=eps,
        predicted_error=relative * float(v.abs().max()) if float(v.abs().max()) > 0 else 0.0,
        predicted_relative=relative,
        paper_degree=paper_degree(bound, budget),
        degree=degree,
        coefficients=tuple(coefficients),
        fitted=fitted,
    )


# ---------------------------------------------------------------------------------------------------
# Running graphs without side effects
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


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
    if node.target is POLY_OP:
        q, k, v, key_weight, alibi, scale, _, causal, window = node.args
        return q, k, v, key_weight, alibi, scale, causal, window, None
    if node.target is SWITCHABLE_OP:
        q, k, v, key_weight, alibi, switch, scale, _, causal, window = node.args
        return q, k, v, key_weight, alibi, scale, causal, window, switch
    return None


class _SiteErrors(fx.Interpreter):
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
        self.unmeasured: dict[fx.Node, str] = {}
        self.watch = watch or {}
        self.captured: dict[fx.Node, torch.Tensor] = {}

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
            if active is None or bool(active):
                self._measure(n, out, q, k, v, key_weight, alibi, scale, causal, window)
            else:  # the site ran exact on this call (switched, or its key length is below min_seq_len)
                self.local_errors[n] = math.nan
                self.unmeasured[n] = "the site ran exact on this call (key length below min_seq_len, or switched)"
        return result

    def _measure(self, n, out, q, k, v, key_weight, alibi, scale, causal, window) -> None:
        reason = unusable_reason(q, k, v)
        if reason is None:
            with torch.no_grad():
                exact = exact_attention(q.detach(), k.detach(), v.detach(), scale=scale, causal=causal,
                                        key_weight=key_weight, alibi_slopes=alibi, window=window).float()
                if not bool(torch.isfinite(exact).all()):
                    reason = "exact attention is not finite on these inputs (NaN/inf)"
                else:
                    diff = (out.detach().float() - exact).norm()
                    self.local_errors[n] = _finite_or_inf(float(diff / exact.norm().clamp_min(1e-30)))
                    return
        self.local_errors[n] = math.nan
        self.unmeasured[n] = reason


@dataclass
class Measurement:
    grads: list[torch.Tensor] = field(default_factory=list)
    local_errors: dict = field(default_factory=dict)
    captured: dict = field(default_factory=dict)
    unmeasured: dict = field(default_factory=dict)  # node -> why its local error is NaN

    def finite(self) -> bool:
        """Whether every gradient is finite (else no gradient error can be measured against it)."""
        return all(bool(torch.isfinite(g).all()) for g in self.grads)


def run_with_grads(gm: fx.GraphModule, inputs: Sequence[Any], rng_state: torch.Tensor,
                   watch: dict[fx.Node, int] | None = None) -> Measurement:
    """One forward+backward of `gm` on clones of `inputs` with fixed cotangents; no side effects (inputs and
    the module's buffers are cloned, so buffer updates such as BatchNorm's land on the clones)."""
    clones, wanted = _grad_inputs(inputs)
    with rng_preserved(), torch.enable_grad():
        torch.set_rng_state(rng_state)
        interpreter = _SiteErrors(gm, watch)
        outputs = interpreter.run(*clones)
        flat = [o for o in (outputs if isinstance(outputs, (tuple, list)) else [outputs])
                if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]
        generator = torch.Generator(device="cpu").manual_seed(20240)
        cotangents = [torch.randn(o.shape, generator=generator, dtype=torch.float32).to(o) for o in flat]
        targets = [clones[i] for i in wanted]
        grads = torch.autograd.grad(flat, targets, cotangents, allow_unused=True) if flat else []
    grads = [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(grads, targets)]
    return Measurement(grads, interpreter.local_errors, interpreter.captured, interpreter.unmeasured)


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
    return _finite_or_inf(float(num / den))
