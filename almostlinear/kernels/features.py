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
    """P(s) = c_0 + c_1 s + c_2 s^2 + ... elementwise, by Horner (coefficients in increasing degree)."""
    out = torch.full_like(s, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        out = out * s + c
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


def active_fake_mode():
    """The FakeTensorMode in effect (tracing: dynamo, AOT autograd, fake kernels), or None."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)


def real_tensors():
    """Context in which tensors are real even while a FakeTensorMode is active (tables meant to be cached)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    return unset_fake_temporarily()


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


def _quad2_layout(d: int, leaf: int = 8) -> tuple[list, int]:
    """(groups, rank) of :class:`Quad2Features`' blocked layout; plain integers, no tensors (the op's fake
    kernel gets its state shape from here).  A group is (position, "diag", n, t) for n leaf squares of size
    t, (position, "off", n, P) for n P x P rectangles, or the "dslice" (position, lo, hi) / "oslice"
    (position, p0, p1, q0, q1) single blocks when d is not leaf * 2^k."""
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


class Quad2Features:
    """Degree-2 features in a blocked symmetric layout, built with a few broadcast products.

    The symmetric square x x^T is split recursively: off-diagonal rectangles x_P x_Q^T (counted once,
    weight 2 on the query side) and leaf diagonal squares x_t x_t^T of size <= ``leaf`` (kept full,
    weight 1).  Layout: [1 | x | leaf squares | rectangles, grouped by size]; rank = 1 + d + sum t^2 +
    sum |P||Q| (d = 64, leaf 8: 2369 vs the fully packed 2145, but far cheaper to build on a CPU: when
    d = leaf * 2^k every group is one broadcast product).  Same interface as :class:`FeatureMap`.
    Query side: [c0 | c1 s x | c2 s^2 (x x^T, weighted)].
    """

    def __init__(self, d: int, coeffs: Sequence[float], scale: float, leaf: int = 8):
        self.d, self.degree, self.coeffs, self.scale = d, 2, tuple(coeffs), float(scale)
        self.groups, self.rank = _quad2_layout(d, leaf)
        self.c0, self.c1s = coeffs[0], coeffs[1] * self.scale
        self.r2 = math.sqrt(coeffs[2]) * self.scale  # x' = r2 x on the query side
        self._maps = {}
        # (a, b) -> positions of x_a x_b: i1 its own entry, i2 the mirrored one; half: leaf squares (both
        # orders stored).  Built as lists and turned into tensors once (element-wise tensor writes cost
        # ~5 us each, ~1 ms under a FakeTensorMode: d = 128 took a minute there).
        i1, i2, half = [0] * (d * d), [0] * (d * d), [False] * (d * d)
        covered = 0
        for g in self.groups:
            p, kind = g[0], g[1]
            if kind in ("diag", "dslice"):
                blocks = ([(b * g[3], g[3]) for b in range(g[2])] if kind == "diag" else [(g[2], g[3] - g[2])])
                for bi, (lo, t) in enumerate(blocks):
                    base = p + bi * t * t
                    covered += t * t
                    for i in range(t):
                        for j in range(t):
                            ab = (lo + i) * d + lo + j
                            i1[ab], i2[ab], half[ab] = base + i * t + j, base + j * t + i, True
            else:
                if kind == "off":
                    P = g[3]
                    blocks = [(b * 2 * P, b * 2 * P + P, P, P) for b in range(g[2])]
                else:
                    blocks = [(g[2], g[4], g[3] - g[2], g[5] - g[4])]
                for bi, (p0, q0, P, Q) in enumerate(blocks):
                    base = p + bi * P * Q
                    covered += 2 * P * Q
                    for i in range(P):
                        for j in range(Q):
                            pidx = base + i * Q + j
                            ab, ba = (p0 + i) * d + q0 + j, (q0 + j) * d + p0 + i
                            i1[ab] = i1[ba] = i2[ab] = i2[ba] = pidx
        assert covered == d * d
        with real_tensors():  # device independent CPU tables: real even when built while tracing
            self._i1 = torch.tensor(i1, dtype=torch.long)
            self._i2 = torch.tensor(i2, dtype=torch.long)
            self._half = torch.tensor(half, dtype=torch.bool)

    def unpack(self, state: torch.Tensor, off_factor: float) -> torch.Tensor:
        """Quadratic rows of a state [..., r, E] -> symmetric [..., d, d, E] with
        x^T M x = sum_f w_f monomial_f(x) state_f where w_f = 1 on leaf squares and ``off_factor`` (times 2,
        as both (a, b) and (b, a) appear in x^T M x) on rectangles."""
        i1, i2, w1, w2 = self._tables(state.device, state.dtype, off_factor)
        m = state.index_select(-2, i1) * w1.unsqueeze(-1) + state.index_select(-2, i2) * w2.unsqueeze(-1)
        return m.unflatten(-2, (self.d, self.d))

    def _tables(self, device, dtype, off_factor):
        """(i1, i2, w1, w2) for :meth:`unpack` on ``device``/``dtype``: cached for real tensors; while a
        FakeTensorMode is active made from fake copies of the CPU tables and not cached (a cached fake
        table would break every later real call)."""
        mode = active_fake_mode()
        if mode is None:
            key = (device, dtype, off_factor)
            if key not in self._maps:
                self._maps[key] = self._make_tables(self._i1, self._i2, self._half, device, dtype, off_factor)
            return self._maps[key]
        fake = [mode.from_tensor(t) for t in (self._i1, self._i2, self._half)]
        return self._make_tables(*fake, device, dtype, off_factor)

    @staticmethod
    def _make_tables(i1, i2, half, device, dtype, off_factor):
        w1 = torch.where(half, 0.5, off_factor).to(device, dtype)
        w2 = torch.where(half, 0.5, 0.0).to(device, dtype)
        return i1.to(device), i2.to(device), w1, w2

    def _views(self, g, x):
        """(p, size, xP [..., n, P], xQ [..., n, Q], diagonal?) for a group."""
        p, kind = g[0], g[1]
        if kind == "diag":
            n, t = g[2], g[3]
            xv = x.unflatten(-1, (n, t))
            return p, n * t * t, (n, t, t), xv, xv, True
        if kind == "off":
            n, P = g[2], g[3]
            xv = x.unflatten(-1, (n, 2, P))
            return p, n * P * P, (n, P, P), xv[..., 0, :], xv[..., 1, :], False
        if kind == "dslice":
            lo, hi = g[2], g[3]
            xv = x[..., lo:hi].unsqueeze(-2)
            return p, (hi - lo) ** 2, (1, hi - lo, hi - lo), xv, xv, True
        p0, p1, q0, q1 = g[2:]
        return (p, (p1 - p0) * (q1 - q0), (1, p1 - p0, q1 - q0), x[..., p0:p1].unsqueeze(-2),
                x[..., q0:q1].unsqueeze(-2), False)

    def phi(self, x: torch.Tensor, side: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = x.new_empty(*x.shape[:-1], self.rank)
        d = self.d
        q = side == "q"
        out[..., 0] = self.c0 if q else 1.0
        if q:
            torch.mul(x, self.c1s, out=out[..., 1:1 + d])
            x = x * self.r2
            x2 = x * 2.0
        else:
            out[..., 1:1 + d] = x
            x2 = x
        for g in self.groups:
            p, size, shp, xP, xQ, diag = self._views(g, x)
            if not diag and q:
                xP = self._views(g, x2)[3]
            torch.mul(xP.unsqueeze(-1), xQ.unsqueeze(-2), out=out[..., p:p + size].unflatten(-1, shp))
        return out

    def vjp(self, x: torch.Tensor, dphi: torch.Tensor, side: str) -> torch.Tensor:
        d = self.d
        q = side == "q"
        dx = torch.zeros_like(x)
        xs = x * self.r2 if q else x
        w = 2.0 if q else 1.0
        for g in self.groups:
            p, size, shp, xP, xQ, diag = self._views(g, xs)
            _, _, _, dP, dQ, _ = self._views(g, dx)
            gm = dphi[..., p:p + size].unflatten(-1, shp)
            if diag:
                dP += (gm * xQ.unsqueeze(-2)).sum(-1) + (gm * xP.unsqueeze(-1)).sum(-2)
            else:
                dP += (gm * xQ.unsqueeze(-2)).sum(-1).mul_(w)
                dQ += (gm * xP.unsqueeze(-1)).sum(-2).mul_(w)
        if q:
            dx.mul_(self.r2)
            dx += dphi[..., 1:1 + d] * self.c1s
        else:
            dx += dphi[..., 1:1 + d]
        return dx


def fast_rank(d: int, degree: int) -> int:
    """Rank of the layout :func:`fast_feature_map` builds (2369 for d = 64, degree 2): arithmetic only, no
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
