"""Polynomial validation and monomial feature maps.

P(s) = sum_k c_k s^k with s = scale * q.k is factorised as P(s) = phi_q(q) . phi_k(k) with packed
(symmetric) monomial features:

    phi_k(x) = [x^alpha]                                    for all multisets alpha, |alpha| <= g
    phi_q(x) = [c_|alpha| * scale^|alpha| * multinom(alpha) * x^alpha]

(the coefficients sit on the query side, so negative odd coefficients are fine).  The rank is
r = C(d + g, g); for g = 2 the blocks are [1 | x_a | x_a x_b (a <= b)] with multinom = 2 off the
diagonal.  All functions work on [..., D] tensors and return [..., r].
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import torch

__all__ = ["taylor_coefficients", "validate_polynomial", "feature_rank", "FeatureMap", "evaluate_polynomial",
           "evaluate_polynomial_derivative"]

_TOL = 1e-12


def taylor_coefficients(degree: int) -> tuple[float, ...]:
    """Taylor coefficients (c_0 .. c_degree) of exp: c_k = 1 / k!."""
    _check_degree(degree)
    return tuple(1.0 / math.factorial(k) for k in range(degree + 1))


def _check_degree(degree) -> None:
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2 or degree % 2:
        raise ValueError(
            f"degree must be an even int >= 2 (e.g. 2 or 4) so that P(s) > 0 can hold; got {degree!r}")


def validate_polynomial(degree: int, coefficients: Sequence[float] | None = None) -> tuple[float, ...]:
    """Return the coefficients (c_0..c_g) after checking that P(s) > 0 for every real s.

    Raises ValueError naming the problem: odd / too small degree, wrong number of coefficients,
    non-finite values, non-positive leading coefficient, or a real s where P(s) <= 0.
    """
    _check_degree(degree)
    if coefficients is None:
        return taylor_coefficients(degree)
    coeffs = tuple(float(c) for c in coefficients)
    if len(coeffs) != degree + 1:
        raise ValueError(f"coefficients must have degree + 1 = {degree + 1} entries (c_0..c_{degree}); "
                         f"got {len(coeffs)}: {coeffs}")
    if not all(math.isfinite(c) for c in coeffs):
        raise ValueError(f"coefficients must be finite; got {coeffs}")
    if coeffs[-1] <= 0:
        raise ValueError(f"the leading coefficient c_{degree} must be > 0 so that P(s) > 0 for all real s; "
                         f"got {coeffs[-1]}")
    pmin, smin = _poly_min(coeffs)
    if not pmin > _TOL:
        raise ValueError(f"P(s) = sum c_k s^k with coefficients {coeffs} is not positive for all real s: "
                         f"min P = {pmin:.6g} at s = {smin:.6g}; attention weights must stay > 0")
    return coeffs


def _poly_min(coeffs: Sequence[float]) -> tuple[float, float]:
    import numpy as np
    p = np.polynomial.Polynomial(coeffs)
    crit = p.deriv().roots()
    cands = [0.0] + [float(z.real) for z in crit if abs(z.imag) <= 1e-9 * max(1.0, abs(z))]
    vals = [(float(p(s)), s) for s in cands]
    return min(vals)


def feature_rank(d: int, degree: int) -> int:
    return math.comb(d + degree, degree)


def evaluate_polynomial(s: torch.Tensor, coefficients: Sequence[float]) -> torch.Tensor:
    """P(s) = c_0 + c_1 s + c_2 s^2 + ... elementwise, by Horner (coefficients in increasing degree).  Without
    autograd the steps run in place on one new tensor (the kernels' diagonal blocks: a full_like and two
    temporaries per step cost ~2x); the arithmetic, and so the result, is the same either way."""
    if len(coefficients) == 1:
        return torch.full_like(s, coefficients[0])
    in_place = not (torch.is_grad_enabled() and s.requires_grad)
    lower = list(reversed(coefficients[:-1]))  # c_{n-1}, ..., c_0
    out = torch.mul(s, coefficients[-1])
    for i, c in enumerate(lower):
        out = out.add_(c) if in_place else out + c
        if i + 1 < len(lower):
            out = out.mul_(s) if in_place else out * s
    return out


def evaluate_polynomial_derivative(s: torch.Tensor, coefficients: Sequence[float]) -> torch.Tensor:
    """P'(s) elementwise, by Horner (coefficients of P in increasing degree)."""
    return evaluate_polynomial(s, [k * coefficients[k] for k in range(1, len(coefficients))])


class FeatureMap:
    """Packed monomial features for one (d, degree, coefficients, scale).

    ``phi(x, side)`` with side "q" (coefficient weighted) or "k" (raw monomials): [..., D] -> [..., r].
    ``vjp(x, dphi, side)``: the analytic J_phi(x)^T dphi, [..., r] -> [..., D].
    Degree 2 uses gathers and a d x d matvec; higher degrees use index_add_.
    """

    def __init__(self, d: int, degree: int, coeffs: Sequence[float], scale: float, device, dtype=torch.float32):
        self.d, self.degree, self.coeffs, self.scale = d, degree, tuple(coeffs), float(scale)
        self.device, self.dtype = device, dtype
        idx, qw, off = [], [], [0]
        for k in range(degree + 1):
            combos = list(itertools.combinations_with_replacement(range(d), k))
            w = coeffs[k] * self.scale ** k
            ws = []
            for cb in combos:
                mult = math.factorial(k)
                for _, grp in itertools.groupby(cb):
                    mult //= math.factorial(len(list(grp)))
                ws.append(w * mult)
            idx.append(torch.tensor(combos, dtype=torch.long, device=device).reshape(len(combos), k))
            qw.append(torch.tensor(ws, dtype=dtype, device=device))
            off.append(off[-1] + len(combos))
        self.idx, self.offsets = idx, off
        self.qweight = torch.cat(qw)  # [r]
        self.rank = off[-1]
        if degree == 2:
            ia, ib = torch.triu_indices(d, d, device=device)
            self.ia, self.ib = ia, ib
            # index map (a, b) -> position of pair(min, max) in the packed quadratic block
            pos = torch.empty(d, d, dtype=torch.long, device=device)
            p = torch.arange(ia.numel(), device=device)
            pos[ia, ib] = p
            pos[ib, ia] = p
            self.pair_pos = pos.reshape(-1)
            diag = (ia == ib).to(dtype)
            self.jac2 = 1.0 + diag  # d(x_a x_b) has x_b at a and x_a at b; diagonal doubles

    def phi(self, x: torch.Tensor, side: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """[..., D] -> [..., r] features (float32 in, same dtype out)."""
        shape = x.shape[:-1]
        if out is None:
            out = x.new_empty(*shape, self.rank)
        o = self.offsets
        out[..., 0] = 1.0
        out[..., o[1]:o[2]] = x
        if self.degree == 2:
            torch.mul(x[..., self.ia], x[..., self.ib], out=out[..., o[2]:o[3]])
        else:
            for k in range(2, self.degree + 1):
                ids = self.idx[k]
                blk = x[..., ids[:, 0]]
                for t in range(1, k):
                    blk = blk * x[..., ids[:, t]]
                out[..., o[k]:o[k + 1]] = blk
        if side == "q":
            out.mul_(self.qweight)
        return out

    def vjp(self, x: torch.Tensor, dphi: torch.Tensor, side: str) -> torch.Tensor:
        """J_phi(x)^T dphi: x [..., D], dphi [..., r] -> [..., D]."""
        o = self.offsets
        if side == "q":
            dphi = dphi * self.qweight
        dx = dphi[..., o[1]:o[2]].clone()
        if self.degree == 2:
            e = (dphi[..., o[2]:o[3]] * self.jac2)[..., self.pair_pos]
            e = e.reshape(*x.shape[:-1], self.d, self.d)
            dx += (e @ x.unsqueeze(-1)).squeeze(-1)
            return dx
        for k in range(2, self.degree + 1):
            ids = self.idx[k]
            g = dphi[..., o[k]:o[k + 1]]
            cols = [x[..., ids[:, t]] for t in range(k)]
            for t in range(k):
                prod = g
                for t2 in range(k):
                    if t2 != t:
                        prod = prod * cols[t2]
                dx.index_add_(-1, ids[:, t], prod)
        return dx

    def phi_t(self, xT: torch.Tensor, side: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Feature-major :meth:`phi`: xT [..., D, R] -> [..., r, R] (a transposed view; ``out`` is not used)."""
        return self.phi(xT.transpose(-1, -2), side).transpose(-1, -2)

    def vjp_t(self, xT: torch.Tensor, dphiT: torch.Tensor, side: str, work=None) -> torch.Tensor:
        """Feature-major :meth:`vjp`: xT [..., D, R], dphiT [..., r, R] -> [..., D, R]."""
        return self.vjp(xT.transpose(-1, -2), dphiT.transpose(-1, -2), side).transpose(-1, -2)


def active_fake_mode():
    """The FakeTensorMode in effect (tracing: dynamo, AOT autograd, fake kernels), or None."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)


def feature_map(d: int, degree: int, coeffs: tuple, scale: float, device: str, dtype=torch.float32) -> FeatureMap:
    """The :class:`FeatureMap` for these arguments, cached.  Its tables live on ``device`` in ``dtype``; while a
    FakeTensorMode is active they would be fake, so there it is built per call and never cached."""
    if active_fake_mode() is not None:
        return FeatureMap(d, degree, coeffs, scale, torch.device(device), dtype)
    return _feature_map_cached(d, degree, coeffs, scale, device, dtype)


@functools.lru_cache(maxsize=64)
def _feature_map_cached(d: int, degree: int, coeffs: tuple, scale: float, device: str, dtype) -> FeatureMap:
    return FeatureMap(d, degree, coeffs, scale, torch.device(device), dtype)


def _blocks(lo: int, hi: int, leaf: int, diag: list, off: list) -> None:
    """Recursively split the symmetric square [lo, hi)^2 into leaf diagonal squares and off-diagonal
    rectangles (P-range x Q-range, P before Q)."""
    n = hi - lo
    if n <= leaf:
        diag.append((lo, hi))
        return
    mid = lo + (n + 1) // 2
    _blocks(lo, mid, leaf, diag, off)
    _blocks(mid, hi, leaf, diag, off)
    off.append((lo, mid, mid, hi))


def default_leaf(d: int) -> int:
    """The tile size of :class:`Quad2Features` for head dim d: the smallest of 1, 2, 4, 8 with d = tile * 2^k
    (every group is then one broadcast product; the rank falls with the tile: 2,145 / 2,177 / 2,241 / 2,369 at
    d = 64, while building and differentiating the features feature-major cost the same, measured), else 8."""
    for leaf in (1, 2, 4, 8):
        if d % leaf == 0 and (d // leaf) & (d // leaf - 1) == 0:
            return leaf
    return 8


def _quad2_layout(d: int, leaf: int | None = None) -> tuple[list, int]:
    """(groups, rank) of :class:`Quad2Features`' blocked layout; plain integers, no tensors (the op's fake
    kernel gets its state shape from here).  A group is (position, "diag", n, t) for n leaf squares of size
    t, (position, "off", n, P) for n P x P rectangles, or the "dslice" (position, lo, hi) / "oslice"
    (position, p0, p1, q0, q1) single blocks when d is not leaf * 2^k."""
    leaf = leaf or default_leaf(d)
    diag, off = [], []
    _blocks(0, d, leaf, diag, off)
    off.sort(key=lambda b: (-(b[1] - b[0]), b[0]))
    uniform = d % leaf == 0 and (d // leaf) & (d // leaf - 1) == 0
    groups = []
    pos = 1 + d
    if uniform:
        groups.append((pos, "diag", len(diag), diag[0][1] - diag[0][0]))
        pos += d * (diag[0][1] - diag[0][0])
        sizes = sorted({b[1] - b[0] for b in off}, reverse=True)
        for P in sizes:
            n = d // (2 * P)
            groups.append((pos, "off", n, P))
            pos += n * P * P
    else:
        for lo, hi in diag:
            groups.append((pos, "dslice", lo, hi))
            pos += (hi - lo) ** 2
        for b in off:
            groups.append((pos, "oslice") + b)
            pos += (b[1] - b[0]) * (b[3] - b[2])
    return groups, pos


def _group_size(g) -> int:
    """Number of features in a group of :func:`_quad2_layout`."""
    kind = g[1]
    if kind in ("diag", "off"):
        return g[2] * g[3] * g[3]
    if kind == "dslice":
        return (g[3] - g[2]) ** 2
    return (g[3] - g[2]) * (g[5] - g[4])


class Quad2Features:
    """Degree-2 features in the block-symmetric layout (the CPU path's; described once here).

    Block-symmetric layout: P(s) = c0 + c1 s + c2 s^2 with s = scale q.k, and (q.k)^2 = sum_ab q_a q_b k_a k_b
    is symmetric in (a, b), so only the tile pairs (I <= J) of the d x d outer product x x^T are kept: the d
    coordinates are cut into tiles of t = ``leaf`` (:func:`default_leaf`), a diagonal tile pair (I, I) is kept
    whole (both orders of each product, weight 1), an off-diagonal pair (I < J) once with weight 2 on the query
    side.  Off-diagonal pairs are grouped into the rectangles of a recursive halving of the square, so that
    every group is one broadcast product (when d = t * 2^k):

        phi_k(x) = [1 | x | x_I x_I^T for each diagonal tile I | x_P x_Q^T for each rectangle (P, Q)]
        phi_q(x) = [c0 | c1 scale x | c2 scale^2 (x_I x_I^T | 2 x_P x_Q^T)]

    rank r = 1 + d + t^2 C(d / t + 1, 2) and phi_q(q) . phi_k(k) = P(s) exactly.  At d = 64: 2,145 with t = 1
    (the default: every pair once, the fully packed count), 2,369 with t = 8, 2,625 with t = 16, against 4,161
    for the square d x (d + 1); at d = 128: 8,385 (t = 1).  A state Sum_j phi_k(k_j)^T X_j is read and updated
    by plain matmuls on contiguous blocks.  Features are built feature-major, [..., r, R] for R tokens
    (:meth:`phi_t`, :meth:`vjp_t`): every elementwise op runs along the tokens, a long contiguous axis, so that
    building and differentiating cost the same for any tile size (measured for t = 1..16 at d = 64).
    :meth:`phi` / :meth:`vjp` are the same maps token-major ([..., D] -> [..., r]), the interface of
    :class:`FeatureMap`.  The redesigned Triton path (kernels/triton/symmetric.py) uses the same block-symmetric
    pairs with t = 16 (tensor-core tiles), one 256-wide block per pair I <= J built in registers; the groups of
    :func:`_quad2_layout` are plain (offset, shape) integers a kernel can share.
    """

    def __init__(self, d: int, coeffs: Sequence[float], scale: float, leaf: int | None = None):
        self.d, self.degree, self.coeffs, self.scale = d, 2, tuple(coeffs), float(scale)
        self.groups, self.rank = _quad2_layout(d, leaf)
        self.c0, self.c1s = coeffs[0], coeffs[1] * self.scale
        self.r2 = math.sqrt(coeffs[2]) * self.scale  # x' = r2 x on the query side
        self.work_size = max(_group_size(g) for g in self.groups)  # scratch of vjp_t, per token

    def _views(self, g, xT):
        """(p, n, P, Q, xP [..., n, P, R], xQ [..., n, Q, R], diagonal?) of a group; xT [..., D, R]."""
        p, kind = g[0], g[1]
        if kind == "diag":
            n, t = g[2], g[3]
            xv = xT.unflatten(-2, (n, t))
            return p, n, t, t, xv, xv, True
        if kind == "off":
            n, P = g[2], g[3]
            xv = xT.unflatten(-2, (n, 2, P))
            return p, n, P, P, xv[..., 0, :, :], xv[..., 1, :, :], False
        if kind == "dslice":
            lo, hi = g[2], g[3]
            xv = xT[..., lo:hi, :].unsqueeze(-3)
            return p, 1, hi - lo, hi - lo, xv, xv, True
        p0, p1, q0, q1 = g[2:]
        return (p, 1, p1 - p0, q1 - q0, xT[..., p0:p1, :].unsqueeze(-3), xT[..., q0:q1, :].unsqueeze(-3), False)

    def phi_t(self, xT: torch.Tensor, side: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Feature-major features: xT [..., D, R] -> [..., r, R] (side "q" or "k")."""
        if out is None:
            out = xT.new_empty(*xT.shape[:-2], self.rank, xT.shape[-1])
        return self.bind_phi_t(xT, side, out)()

    def bind_phi_t(self, xT: torch.Tensor, side: str, out: torch.Tensor):
        """A function of no arguments that fills ``out`` [..., r, R] with the features of xT [..., D, R] (as xT
        holds them when it is called) and returns it.  The views of every group are made once: on buffers
        reused block after block (CallContext) that saves their Python cost, ~0.4 ms a call at d = 64, a third
        of building the features of 2,048 tokens."""
        d, q = self.d, side == "q"
        head, lin = out[..., 0, :], out[..., 1:1 + d, :]
        xs, x2 = (torch.empty_like(xT), torch.empty_like(xT)) if q else (xT, xT)  # r2 x and 2 r2 x on the q side
        products = []
        for g in self.groups:
            p, n, P, Q, xP, xQ, diag = self._views(g, xs)
            if not diag:
                xP = self._views(g, x2)[4]
            products.append((xP.unsqueeze(-2), xQ.unsqueeze(-3), out[..., p:p + n * P * Q, :].unflatten(-2, (n, P, Q))))

        def run():
            if q:
                head.fill_(self.c0)
                torch.mul(xT, self.c1s, out=lin)
                torch.mul(xT, self.r2, out=xs)
                torch.mul(xT, 2.0 * self.r2, out=x2)
            else:
                head.fill_(1.0)
                lin.copy_(xT)
            for a, b, blk in products:
                torch.mul(a, b, out=blk)
            return out
        return run

    def vjp_t(self, xT: torch.Tensor, dphiT: torch.Tensor, side: str, work: torch.Tensor | None = None):
        """J_phi^T dphi, feature-major: xT [..., D, R], dphiT [..., r, R] -> [..., D, R].  ``work``: optional
        scratch of at least work_size * R elements per leading index."""
        return self.bind_vjp_t(xT, dphiT, side, torch.empty_like(xT), work)()

    def bind_vjp_t(self, xT: torch.Tensor, dphiT: torch.Tensor, side: str, dx: torch.Tensor,
                   work: torch.Tensor | None = None):
        """A function of no arguments that writes J_phi^T dphi into ``dx`` [..., D, R] (from xT and dphiT as they
        are when it is called) and returns it; the views made once, as in :meth:`bind_phi_t`."""
        d, q = self.d, side == "q"
        xs = torch.empty_like(xT) if q else xT  # r2 x on the q side
        w = 2.0 if q else 1.0
        terms = []
        for g in self.groups:
            p, n, P, Q, xP, xQ, diag = self._views(g, xs)
            _, _, _, _, dP, dQ, _ = self._views(g, dx)
            gm = dphiT[..., p:p + n * P * Q, :].unflatten(-2, (n, P, Q))
            tmp = None if work is None else work.reshape(-1)[:gm.numel()].view(gm.shape)
            terms.append((gm, xP.unsqueeze(-2), xQ.unsqueeze(-3), tmp, dP, dQ, 1.0 if diag else w))
        lin = dphiT[..., 1:1 + d, :]

        def run():
            if q:
                torch.mul(xT, self.r2, out=xs)
            dx.zero_()
            for gm, xp, xq, tmp, dP, dQ, alpha in terms:
                dP.add_(torch.mul(gm, xq, out=tmp).sum(-2), alpha=alpha)
                dQ.add_(torch.mul(gm, xp, out=tmp).sum(-3), alpha=alpha)
            if q:
                dx.mul_(self.r2).add_(lin, alpha=self.c1s)
            else:
                dx.add_(lin)
            return dx
        return run

    def phi(self, x: torch.Tensor, side: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Token-major features [..., D] -> [..., r]."""
        res = self.phi_t(x.unsqueeze(-1), side).squeeze(-1)
        return res if out is None else out.copy_(res)

    def vjp(self, x: torch.Tensor, dphi: torch.Tensor, side: str) -> torch.Tensor:
        """Token-major J_phi(x)^T dphi: x [..., D], dphi [..., r] -> [..., D]."""
        return self.vjp_t(x.unsqueeze(-1), dphi.unsqueeze(-1), side).squeeze(-1)


def fast_rank(d: int, degree: int) -> int:
    """Rank of the layout :func:`fast_feature_map` builds (2145 for d = 64, degree 2): arithmetic only, no
    feature tables (fake kernels call it)."""
    return _quad2_layout(d)[1] if degree == 2 else feature_rank(d, degree)


def fast_feature_map(d: int, degree: int, coeffs: tuple, scale: float, device: str, dtype=torch.float32):
    """The feature map the chunked torch path uses: blocked layout for degree 2 (device and dtype independent,
    cached; its per-device tables are cached on real tensors only), packed otherwise (see :func:`feature_map`)."""
    if degree == 2:
        return _quad2_features(d, coeffs, scale)
    return feature_map(d, degree, coeffs, scale, device, dtype)


@functools.lru_cache(maxsize=64)
def _quad2_features(d: int, coeffs: tuple, scale: float) -> Quad2Features:
    return Quad2Features(d, coeffs, scale)
