"""Fast pure-torch path (any device; the default on CPU): chunked forward and analytic backward.

Shapes: q [B, Hq, L, D], k [B, Hk, S, D], v [B, Hk, S, Dv], key_weight [B, S] | None,
alibi_slopes [Hq] | None.  All inputs float32 (or float64) and contiguous; outputs in the same dtype.
GQA: queries are viewed as [B, Hk, G, L, D] (G = Hq // Hk); K/V are never repeated.

Three regimes, each O(n) memory and never holding more than one chunk of features:

* global (non-causal, no window): state Saug = phi_k(K)^T [f*V | f] ([r, Dv+1], f = key factor),
  out = phi_q(Q) Saug[:, :Dv] / phi_q(Q) Saug[:, Dv].
* causal (no window): chunks of ``chunk`` tokens; inside a chunk P(scale q.k) directly in d-space with
  a tril mask, across chunks the running (ALiBi-decayed) state; degree 2 without ALiBi keeps the running
  states in the square d-space layout (M, S1, S0), updated and consumed by plain matmuls, no features.
* banded (window > 0): every query chunk against the key band it can see, P(s) directly in d-space:
  O(L * (chunk + 2 * window) * D), linear in n for a fixed window.

Weights: W_ij = P(s_ij) * key_weight_j * exp(m_h (j - i)) * valid_ij.  The ALiBi factor is split into a
key part and a query part that cancels in the normalisation, so exponents never exceed 0
(no overflow at j = 65536): global uses exp(m (j - j*)) with j* the argmax of m j; causal uses
exp(a (j - i) + (m - a) j) with a = max(m, 0) (a decayed state); banded subtracts the row maximum.
A row whose weights are all zero (all keys masked) gives 0.

The backward is analytic (see DESIGN.md): Gd = [G / den | -Delta / den], dphi_q = Gd Saug^T,
dSaug = phi_q^T Gd, dphi_k = X dSaug^T, dX = phi_k dSaug, then through phi's Jacobian
(FeatureMap.vjp); causal uses reverse prefix sums over chunks; intra-chunk terms via P'(s).
"""
from __future__ import annotations

import contextlib
import functools

import torch

from .features import Quad2Features, fast_feature_map, fast_rank, poly_deriv_eval, poly_eval

CHUNK = 128
# Degree 2: consume a state that is reused across chunks in d-space (see _q_fwd) instead of building phi and
# its VJP.  The causal recurrences change the state every chunk, where unpacking it did not pay off.
DSPACE = True
# Degree 2, causal, no ALiBi: keep the running states in the square layout (see _sq_accum) so that every
# consumer is one d-space matmul and no feature map or feature VJP is built (A/B at n = 16k, min of 6: 1.27 s vs
# 1.42 s; per 128-token chunk the key side drops from 2.4 ms to 1.1 ms, updates cost 0.97 ms instead of 0.86).
SQUARE_CAUSAL = True
_TINY = 1e-30


def autocast_disabled(t: torch.Tensor):
    """Context with autocast off for ``t``'s device type.  The kernels compute in their inputs' dtypes
    (float32 / float64 features and accumulation); inside an autocast region their matmuls would be recast to
    bfloat16 / float16 (failing on out= scratch buffers, silently losing precision elsewhere)."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()


def _no_autocast(fn):
    """Run ``fn`` (a kernel entry point; its first argument is a tensor on the kernel's device) with autocast off."""
    @functools.wraps(fn)
    def wrapper(t, *args, **kwargs):
        with autocast_disabled(t):
            return fn(t, *args, **kwargs)
    return wrapper


def _fm(q, scale, coeffs):
    return fast_feature_map(q.shape[-1], len(coeffs) - 1, tuple(coeffs), float(scale), str(q.device), q.dtype)


def _inv(den):
    return torch.where(den > _TINY, 1.0 / den.clamp_min(_TINY), torch.zeros_like(den))


def _aug(v, f):
    """[.., C, Dv], f [.., Gs, C] | None -> X [.., C, Gs*(Dv+1)] = [f v | f] per gs (cat layout)."""
    ones = torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    va = torch.cat([v, ones], -1)  # [B, Hk, C, Dv+1]
    if f is None:
        return va
    B, Hk, Gs, C = f.shape
    x = f.unsqueeze(-1) * va.unsqueeze(2)  # [B, Hk, Gs, C, Dv+1]
    return x.permute(0, 1, 3, 2, 4).reshape(B, Hk, C, Gs * va.shape[-1])


def _split(state, Gs):
    """cat layout [B, Hk, r, Gs*E] -> [B, Hk, Gs, r, E]."""
    B, Hk, r, GE = state.shape
    return state.reshape(B, Hk, r, Gs, GE // Gs).permute(0, 1, 3, 2, 4)


def _cat(st):
    """[B, Hk, Gs, r, E] -> cat layout [B, Hk, r, Gs*E]."""
    B, Hk, Gs, r, E = st.shape
    return st.permute(0, 1, 3, 2, 4).reshape(B, Hk, r, Gs * E)


def _qstate_mm(phq, state, Gs):
    """phq [B, Hk, G, C, r] @ state (cat [B, Hk, r, Gs*E]) -> [B, Hk, G, C, E]."""
    B, Hk, G, C, r = phq.shape
    if Gs == 1:
        return (phq.reshape(B, Hk, G * C, r) @ state).reshape(B, Hk, G, C, -1)
    return phq @ _split(state, Gs)


def _qstate_tmm(phq, gd, Gs):
    """sum phq^T gd -> cat layout [B, Hk, r, Gs*E]; phq [B,Hk,G,C,r], gd [B,Hk,G,C,E]."""
    B, Hk, G, C, r = phq.shape
    if Gs == 1:
        return phq.reshape(B, Hk, G * C, r).transpose(-1, -2) @ gd.reshape(B, Hk, G * C, -1)
    return _cat(phq.transpose(-1, -2) @ gd)


class _Ctx:
    """Shared per-call setup: shapes, feature map, factor helpers."""

    def __init__(self, q, k, v, key_weight, alibi, scale, coeffs, causal, window, chunk):
        self.B, self.Hq, self.L, self.D = q.shape
        self.Hk, self.S, self.Dv = k.shape[1], k.shape[2], v.shape[-1]
        self.G = self.Hq // self.Hk
        self.Gs = self.G if alibi is not None else 1
        self.q5 = q.view(self.B, self.Hk, self.G, self.L, self.D)
        self.k, self.v, self.kw, self.alibi = k, v, key_weight, alibi
        self.scale, self.coeffs, self.causal, self.window = scale, tuple(coeffs), causal, window
        self.chunk = chunk
        self.fm = _fm(q, scale, coeffs)
        self.quad = DSPACE and isinstance(self.fm, Quad2Features)  # degree 2: consume states in d-space
        self.square = SQUARE_CAUSAL and self.quad and causal and not window and alibi is None
        self.dt, self.dev = q.dtype, q.device
        self._bufs = {}
        if alibi is not None:
            self.m = alibi.to(self.dt).view(self.Hk, self.G)  # [Hk, G]
            self.a = self.m.clamp_min(0.0)

    def buf(self, name, shape):
        """A contiguous scratch tensor reused across chunks (fresh multi-MB allocations page-fault)."""
        n = 1
        for x in shape:
            n *= x
        b = self._bufs.get(name)
        if b is None or b.numel() < n:
            b = self._bufs[name] = torch.empty(n, dtype=self.dt, device=self.dev)
        return b[:n].view(shape)

    def phi(self, x, side):
        return self.fm.phi(x, side, out=self.buf("phi" + side, (*x.shape[:-1], self.fm.rank)))

    def pos(self, lo, hi):
        return torch.arange(lo, hi, device=self.dev, dtype=self.dt)

    def kw_slice(self, j0, j1):
        return None if self.kw is None else self.kw[:, j0:j1].to(self.dt)

    # ---- key factors (the part of the weight that depends on j only) [B, Hk, Gs, C] | None
    def global_key_factor(self, j0, j1):
        f = None
        if self.alibi is not None:
            jstar = torch.where(self.m > 0, float(self.S - 1), 0.0)
            f = torch.exp(self.m.unsqueeze(-1) * (self.pos(j0, j1) - jstar.unsqueeze(-1)))  # [Hk, G, C]
            f = f.unsqueeze(0)
        return self._with_key_weight(f, j0, j1)

    def _with_key_weight(self, f, j0, j1):
        """Multiply a key factor (or None) by the key weights of keys j0..j1; [B, Hk, Gs, C] | None."""
        kw = self.kw_slice(j0, j1)
        if kw is not None:
            kw = kw[:, None, None, :]
            f = kw if f is None else f * kw
        if f is not None:
            f = f.expand(self.B, self.Hk, self.Gs, j1 - j0)
        return f

    def causal_key_factor(self, j0, j1, c1):
        f = None
        if self.alibi is not None:
            j = self.pos(j0, j1)
            f = torch.exp(self.a.unsqueeze(-1) * (j - c1) + (self.m - self.a).unsqueeze(-1) * j).unsqueeze(0)
        return self._with_key_weight(f, j0, j1)

    def causal_query_factor(self, i0, i1):
        """[1, Hk, G, C, 1] | None: exp(-a (i - i0))."""
        if self.alibi is None:
            return None
        return torch.exp(-self.a.unsqueeze(-1) * (self.pos(i0, i1) - i0)).unsqueeze(0).unsqueeze(-1)

    def block_mult(self, i0, i1, j0, j1, mode):
        """Multiplier M [B|1, Hk|1, G|1, Ci, Cj] (mask * bias factors) for a direct block, or None."""
        i = torch.arange(i0, i1, device=self.dev).unsqueeze(-1)
        j = torch.arange(j0, j1, device=self.dev).unsqueeze(0)
        valid = None
        if self.causal:
            valid = j <= i
            if self.window > 0:
                valid = valid & (j > i - self.window)
        elif self.window > 0:
            valid = (i - j).abs() < self.window
        M = None if valid is None else valid.to(self.dt)
        if self.alibi is not None:
            m = self.m[..., None, None]  # [Hk, G, 1, 1]
            rel = (j - i).to(self.dt)
            if mode == "causal":  # exp(a (j - i) + (m - a) j): consistent with the decayed state
                a = self.a[..., None, None]
                lf = a * rel + (m - a) * j.to(self.dt)
            else:  # banded: subtract the row maximum over the valid range
                ii = i.to(self.dt)
                if self.causal:
                    lo, hi = (ii - self.window + 1).clamp_min(0), ii
                else:
                    lo = (ii - self.window + 1).clamp_min(0)
                    hi = (ii + self.window - 1).clamp_max(self.S - 1)
                off = torch.maximum(m * (lo - ii), m * (hi - ii))
                lf = m * rel - off
            lf = lf if M is None else lf.masked_fill(M == 0, float("-inf"))
            E = torch.exp(lf).unsqueeze(0)
            M = E if M is None else E * M
        kw = self.kw_slice(j0, j1)
        if kw is not None:
            kw = kw[:, None, None, None, :]
            M = kw if M is None else M * kw
        return M

    def band(self, i0, i1):
        if self.causal:
            return max(0, i0 - self.window + 1), i1
        return max(0, i0 - self.window + 1), min(self.S, i1 + self.window - 1)


# ---- consuming a state: query side (num = phi_q(q) S, and its VJP) and key side (dX = phi_k(k) dS, dk).
# Degree 2 never builds phi here: phi_q(q) S = c0 S0 + c1 s q S1 + q'^T M q' with M = unpack(S) [d, d, E],
# computed as T = q' @ M ([C, d, E]) then a contraction; the VJP reuses T (dq' = 2 T gd).

def _q_prep(cx, state, dspace=True):
    """dspace: unpack once for many chunks (pays off when the state is reused; forward passes and the
    causal recurrences rebuild phi instead, which measured faster on a 2-core CPU)."""
    if not (cx.quad and dspace):
        return state
    st = _split(state, cx.Gs)  # [B, Hk, Gs, r, E]
    M = cx.fm.unpack(st, 1.0)  # [B, Hk, Gs, d, d, E]
    return M.flatten(-2), st[..., 1:1 + cx.D, :], st[..., 0, :]


def _q_fwd(cx, qc, prep):
    """qc [B, Hk, G, C, D] -> num [B, Hk, G, C, E], cache for _q_bwd."""
    B, Hk, G, C, D = qc.shape
    if isinstance(prep, torch.Tensor):
        return _qstate_mm(cx.phi(qc, "q"), prep, cx.Gs), None
    M, S1, S0 = prep
    qv = qc.reshape(B, Hk, cx.Gs, (G // cx.Gs) * C, D)
    T = _q_dspace(cx, qc, prep)
    num = (qv.unsqueeze(-2) @ T).squeeze(-2).mul_(cx.fm.r2)  # q'^T M q' = r2 q^T T
    num = num.add_(qv @ S1, alpha=cx.fm.c1s).add_(S0.unsqueeze(-2), alpha=cx.fm.c0)
    return num.view(B, Hk, G, C, -1), T


def _q_dspace(cx, qc, prep):
    """T = q' @ M: [B, Hk, Gs, G/Gs*C, D, E] (q' = r2 q) in a reused scratch buffer."""
    B, Hk, G, C, D = qc.shape
    M = prep[0]
    xs = qc.reshape(B, Hk, cx.Gs, (G // cx.Gs) * C, D) * cx.fm.r2
    return torch.matmul(xs, M, out=cx.buf("T", (*xs.shape[:-1], M.shape[-1]))).unflatten(-1, (D, -1))


def _q_den(cx, qc, state):
    """Only the den column of phi_q(qc) state: [B, Hk, G, C].  Degree 2 in d-space without building phi:
    c0 p0 + c1 s q.p1 + q'^T unpack(p) q' (p = the den columns of the state, one per Gs)."""
    B, Hk, G, C, D = qc.shape
    E = cx.Dv + 1
    p = state[..., cx.Dv::E]  # [B, Hk, r, Gs]
    if not cx.quad:
        return (cx.phi(qc, "q") @ p.unsqueeze(2).transpose(2, -1)).squeeze(-1) if cx.Gs > 1 else \
            (cx.phi(qc, "q") @ p.unsqueeze(2)).squeeze(-1)
    pt = p.transpose(-1, -2)  # [B, Hk, Gs, r]
    Mp = cx.fm.unpack(pt.unsqueeze(-1), 1.0).squeeze(-1)  # [B, Hk, Gs, d, d]
    xs = qc * cx.fm.r2
    z = ((xs @ Mp) * xs).sum(-1)
    z += (qc @ pt[..., 1:1 + D].unsqueeze(-1)).squeeze(-1).mul_(cx.fm.c1s)
    z += pt[..., :1].mul(cx.fm.c0)
    return z


def _q_bwd(cx, qc, prep, T, gd):
    """dq [B, Hk, G, C, D] of sum(gd * num) (gd [B, Hk, G, C, E])."""
    B, Hk, G, C, D = qc.shape
    if isinstance(prep, torch.Tensor):
        return cx.fm.vjp(qc, _qstate_tmm_t(gd, prep, cx.Gs), "q")
    M, S1, S0 = prep
    gv = gd.reshape(B, Hk, cx.Gs, (G // cx.Gs) * C, -1)
    dq = torch.einsum("...ae,...e->...a", T, gv).mul_(2 * cx.fm.r2)
    dq = dq.add_(gv @ S1.transpose(-1, -2), alpha=cx.fm.c1s)
    return dq.view(B, Hk, G, C, D)


# ---- square states (degree 2, causal, Gs == 1): (M, S1, S0) with M [B, Hk, D, D*E] = sum_j x_j (x) x_j (x) Y_j
# (the symmetric d-space matrix that _q_prep / _k_prep unpack from a packed state), S1 [B, Hk, D, E] =
# sum_j x_j Y_j^T and S0 [B, Hk, E] = sum_j Y_j.  Key state: x = k, Y = [f v | f]; query dstate: x = q' = r2 q,
# Y = Gd.  Updated by matmuls without feature maps; consumed in d-space.

def _sq_accum(cx, st, x, Y):
    """st += the chunk's (M, S1, S0); x [B, Hk, C, D], Y [B, Hk, C, E]; None -> a new state."""
    B, Hk, C, D = x.shape
    E = Y.shape[-1]
    Z = torch.mul(x.unsqueeze(-1), Y.unsqueeze(-2), out=cx.buf("sqZ", (B, Hk, C, D, E))).view(B, Hk, C, D * E)
    if st is None:
        return _accum(None, x, Z), _accum(None, x, Y), Y.sum(-2)
    M, S1, S0 = st
    _accum(M, x, Z)
    _accum(S1, x, Y)
    S0 += Y.sum(-2)
    return st


def _sq_qprep(cx, st):
    """_q_prep's (M, S1, S0) ([B, Hk, 1, D, D*E], [B, Hk, 1, D, E], [B, Hk, 1, E]) of a square key state."""
    return tuple(t.unsqueeze(2) for t in st)


def _causal_qprep(cx, state):
    return _sq_qprep(cx, state) if cx.square else _q_prep(cx, state, dspace=False)


def _dspace_den(cx, qc, prep, T):
    """The den column of phi_q(qc) state from T = q' M (prep = (M, S1, S0), packed or square): [B, Hk, G, C]."""
    B, Hk, G, C, D = qc.shape
    _, S1, S0 = prep
    qv = qc.reshape(B, Hk, cx.Gs, (G // cx.Gs) * C, D)
    Dv = cx.Dv
    z = (qv * T[..., Dv]).sum(-1).mul_(cx.fm.r2)
    z += (qv @ S1[..., Dv:]).squeeze(-1).mul_(cx.fm.c1s)
    z += S0[..., Dv:] * cx.fm.c0
    return z.view(B, Hk, G, C)


def _q_scratch_den(cx, qc, prep, state):
    """(T, den column [B, Hk, G, C]) of a query chunk: T = q' M and the den read from it when ``prep`` is in
    d-space (M, S1, S0), else (None, den from the state's den column)."""
    if isinstance(prep, torch.Tensor):
        return None, _q_den(cx, qc, state)
    T = _q_dspace(cx, qc, prep)
    return T, _dspace_den(cx, qc, prep, T)


def _sq_kprep(cx, dst):
    """_k_prep's (N, S1, S0) of a square query dstate (x = q', so the linear part carries c1 s / r2 and the
    constant one c0)."""
    M, S1, S0 = dst
    return M, S1 * (cx.fm.c1s / cx.fm.r2), S0 * cx.fm.c0


def _k_prep(cx, dstate, dspace=True):
    if not (cx.quad and dspace):
        return dstate
    N = cx.fm.unpack(dstate, 0.5)  # [B, Hk, d, d, E']
    return N.flatten(-2), dstate[..., 1:1 + cx.D, :], dstate[..., 0, :]


def _k_consume(cx, kc, prep, X):
    """kc [B, Hk, C, D], X [B, Hk, C, E'] -> dX = phi_k(k) dS [B, Hk, C, E'], dk = J^T (X dS^T)."""
    if isinstance(prep, torch.Tensor):
        phk = cx.phi(kc, "k")
        # Gs == 1: the den column of dX is never used (see _key_side_grads), skip it
        dX = phk @ prep[..., :cx.Dv] if cx.Gs == 1 else phk @ prep
        return dX, cx.fm.vjp(kc, X @ prep.transpose(-1, -2), "k")
    N, S1, S0 = prep
    D = kc.shape[-1]
    T = torch.matmul(kc, N, out=cx.buf("T", (*kc.shape[:-1], N.shape[-1]))).unflatten(-1, (D, -1))
    dX = (kc.unsqueeze(-2) @ T).squeeze(-2).add_(kc @ S1).add_(S0.unsqueeze(-2))
    dk = torch.einsum("...ae,...e->...a", T, X).mul_(2.0).add_(X @ S1.transpose(-1, -2))
    return dX, dk


def _direct_fwd(cx, qc, kc, vaug, M):
    """qc [B,Hk,G,Ci,D], kc [B,Hk,Cj,D], vaug [B,Hk,Cj,Dv+1] -> num/den [B,Hk,G,Ci,Dv+1]."""
    B, Hk, G, Ci, D = qc.shape
    _, s, W = _direct_fwd_scores(cx, qc, kc, M)
    return (W.view(B, Hk, G * Ci, -1) @ vaug).view(B, Hk, G, Ci, -1), s, W


def _direct_bwd(cx, qc, kc, vaug, M, gd, sW=None):
    """Gradients of a direct block given gd [B,Hk,G,Ci,Dv+1]; returns dq [B,Hk,G,Ci,D], dk, dv [B,Hk,Cj,.].
    sW: (s, W) from _direct_fwd_scores when the caller already has them."""
    B, Hk, G, Ci, D = qc.shape
    s, W = sW if sW is not None else _direct_fwd_scores(cx, qc, kc, M)[1:]
    gd2 = gd.reshape(B, Hk, G * Ci, -1)
    dW = (gd2 @ vaug.transpose(-1, -2)).view(B, Hk, G, Ci, -1)
    if M is not None:
        dW = dW * M
    ds = (dW * poly_deriv_eval(s, cx.coeffs)).mul_(cx.scale).view(B, Hk, G * Ci, -1)
    q2 = qc.reshape(B, Hk, G * Ci, D)
    dq = (ds @ kc).view(B, Hk, G, Ci, D)
    dk = ds.transpose(-1, -2) @ q2
    dv = W.view(B, Hk, G * Ci, -1).transpose(-1, -2) @ gd2[..., :cx.Dv]
    return dq, dk, dv


def _direct_fwd_scores(cx, qc, kc, M):
    B, Hk, G, Ci, D = qc.shape
    s = (qc.reshape(B, Hk, G * Ci, D) @ kc.transpose(-1, -2)).mul_(cx.scale).view(B, Hk, G, Ci, -1)
    W = poly_eval(s, cx.coeffs)
    if M is not None:
        W = W * M
    return None, s, W


def _finish(cx, num, den_out, out, i0, i1):
    den = num[..., cx.Dv]
    out[:, :, :, i0:i1] = num[..., :cx.Dv] * _inv(den).unsqueeze(-1)
    den_out[:, :, :, i0:i1] = den


@_no_autocast
def forward(q, k, v, key_weight=None, alibi_slopes=None, *, scale, coeffs, causal=False, window=0,
            chunk=None):
    """Returns out [B, Hq, L, Dv], den [B, Hq, L] (den = sum_j W_ij) and the global state Saug
    [B, Hk, r, Gs*(Dv+1)] in the non-causal, unwindowed case (None otherwise): passing it to
    :func:`backward` saves rebuilding it (one of the backward's [n, r] x [r, Dv+1] products)."""
    chunk = chunk or CHUNK
    cx = _Ctx(q, k, v, key_weight, alibi_slopes, scale, coeffs, causal, window, chunk)
    B, Hk, G, L, Dv = cx.B, cx.Hk, cx.G, cx.L, cx.Dv
    out = q.new_empty(B, Hk, G, L, Dv)
    den = q.new_empty(B, Hk, G, L)
    state = None
    if window > 0:
        for i0 in range(0, L, chunk):
            i1 = min(L, i0 + chunk)
            j0, j1 = cx.band(i0, i1)
            num, _, _ = _direct_fwd(cx, cx.q5[:, :, :, i0:i1], k[:, :, j0:j1], _aug(v[:, :, j0:j1], None),
                                    cx.block_mult(i0, i1, j0, j1, "band"))
            _finish(cx, num, den, out, i0, i1)
    elif not causal:
        state = _global_state(cx)
        prep = _q_prep(cx, state, dspace=False)
        for i0 in range(0, L, chunk):
            i1 = min(L, i0 + chunk)
            _finish(cx, _q_fwd(cx, cx.q5[:, :, :, i0:i1], prep)[0], den, out, i0, i1)
    else:
        running = None
        for i0 in range(0, L, chunk):
            i1 = min(L, i0 + chunk)
            qc, kc = cx.q5[:, :, :, i0:i1], k[:, :, i0:i1]
            num, _, _ = _direct_fwd(cx, qc, kc, _aug(v[:, :, i0:i1], None), cx.block_mult(i0, i1, i0, i1, "causal"))
            if running is not None:
                inter = _q_fwd(cx, qc, _causal_qprep(cx, running))[0]
                qf = cx.causal_query_factor(i0, i1)
                num = num + (inter if qf is None else inter * qf)
            _finish(cx, num, den, out, i0, i1)
            if i1 < L:
                running = _causal_update(cx, running, i0, i1)
    return out.view(B, cx.Hq, L, Dv), den.view(B, cx.Hq, L), state


def state_shape(B, Hq, Hk, D, Dv, degree, alibi: bool, causal: bool, window: int) -> tuple:
    """Shape of the state :func:`forward` returns; (0,) where it returns None.  Arithmetic only (the op's fake
    kernel calls it): no feature map or table is built."""
    if causal or window > 0:
        return (0,)
    Gs = Hq // Hk if alibi else 1
    return (B, Hk, fast_rank(int(D), degree), Gs * (Dv + 1))


def _global_state(cx):
    state = None
    for j0 in range(0, cx.S, cx.chunk):
        j1 = min(cx.S, j0 + cx.chunk)
        phk = cx.phi(cx.k[:, :, j0:j1], "k")
        X = _aug(cx.v[:, :, j0:j1], cx.global_key_factor(j0, j1))
        state = _accum(state, phk, X)
    return state


def _accum(state, a, b):
    """state += a^T b over the last two dims (in place; allocates on the first call)."""
    if state is None:
        return a.transpose(-1, -2) @ b
    r, e = state.shape[-2:]
    state.view(-1, r, e).baddbmm_(a.reshape(-1, *a.shape[-2:]).transpose(-1, -2), b.reshape(-1, *b.shape[-2:]))
    return state


def _decay(cx, c):
    """per-chunk decay exp(-a c) broadcast to the cat layout [1, Hk, 1, Gs*(Dv+1)] | None."""
    if cx.alibi is None:
        return None
    g = torch.exp(-cx.a * c)  # [Hk, G]
    return g.unsqueeze(-1).expand(cx.Hk, cx.G, cx.Dv + 1).reshape(1, cx.Hk, 1, -1)


def _causal_update(cx, state, j0, j1):
    X = _aug(cx.v[:, :, j0:j1], cx.causal_key_factor(j0, j1, j1))
    if cx.square:
        return _sq_accum(cx, state, cx.k[:, :, j0:j1], X)
    phk = cx.phi(cx.k[:, :, j0:j1], "k")
    if state is not None:
        gam = _decay(cx, j1 - j0)
        if gam is not None:
            state.mul_(gam)
    return _accum(state, phk, X)


def _grad_aug(cx, grad_c, out_c, den_c):
    """Gd = [G/den | -Delta/den] for a chunk: [B, Hk, G, C, Dv+1]."""
    inv = _inv(den_c).unsqueeze(-1)
    delta = (grad_c * out_c).sum(-1, keepdim=True)
    return torch.cat([grad_c * inv, -delta * inv], -1)


@_no_autocast
def backward(grad, q, k, v, out, key_weight=None, alibi_slopes=None, *, scale, coeffs, causal=False,
             window=0, chunk=None, state=None):
    """Analytic backward. grad, out: [B, Hq, L, Dv] (same dtype as q); state: the global state the
    non-causal :func:`forward` returned (rebuilt when None). Returns dq, dk, dv."""
    chunk = chunk or CHUNK
    cx = _Ctx(q, k, v, key_weight, alibi_slopes, scale, coeffs, causal, window, chunk)
    B, Hk, G, L, Dv, S = cx.B, cx.Hk, cx.G, cx.L, cx.Dv, cx.S
    g5 = grad.view(B, Hk, G, L, Dv)
    o5 = out.view(B, Hk, G, L, Dv)
    dq = torch.zeros_like(cx.q5)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    if window > 0:
        for i0 in range(0, L, chunk):
            i1 = min(L, i0 + chunk)
            j0, j1 = cx.band(i0, i1)
            qc, kc, va = cx.q5[:, :, :, i0:i1], k[:, :, j0:j1], _aug(v[:, :, j0:j1], None)
            M = cx.block_mult(i0, i1, j0, j1, "band")
            num, _, _ = _direct_fwd(cx, qc, kc, va, M)
            gd = _grad_aug(cx, g5[:, :, :, i0:i1], o5[:, :, :, i0:i1], num[..., Dv])
            a, b, c = _direct_bwd(cx, qc, kc, va, M, gd)
            dq[:, :, :, i0:i1] += a
            dk[:, :, j0:j1] += b
            dv[:, :, j0:j1] += c
    elif not causal:
        if state is None:
            state = _global_state(cx)
        prep = _q_prep(cx, state)
        # two passes over the queries: dq (d-space, its [C, d, Dv+1] scratch is larger than L2), then
        # dstate = sum phi_q^T Gd (features + one accumulating matmul); interleaved, each evicted the
        # other's working set (measured 1.25x slower at n = 32k)
        gds = q.new_empty(B, Hk, G, L, Dv + 1)
        for i0 in range(0, L, chunk):
            i1 = min(L, i0 + chunk)
            qc = cx.q5[:, :, :, i0:i1]
            T, z = _q_scratch_den(cx, qc, prep, state)
            gd = _grad_aug(cx, g5[:, :, :, i0:i1], o5[:, :, :, i0:i1], z)
            dq[:, :, :, i0:i1] = _q_bwd(cx, qc, prep, T, gd)
            gds[:, :, :, i0:i1] = gd
        dstate = None
        for i0 in range(0, L, chunk):
            i1 = min(L, i0 + chunk)
            dstate = _qstate_accum(cx, dstate, cx.phi(cx.q5[:, :, :, i0:i1], "q"), gds[:, :, :, i0:i1])
        kprep = _k_prep(cx, dstate)
        for j0 in range(0, S, chunk):
            j1 = min(S, j0 + chunk)
            _key_side_grads(cx, dk, dv, kprep, j0, j1, cx.global_key_factor(j0, j1))
    else:
        nchunks = (L + chunk - 1) // chunk
        gds = q.new_empty(B, Hk, G, L, Dv + 1)
        state = None
        for i0 in range(0, L, chunk):  # pass A: forward order, recompute the prefix state
            i1 = min(L, i0 + chunk)
            qc, kc, va = cx.q5[:, :, :, i0:i1], k[:, :, i0:i1], _aug(v[:, :, i0:i1], None)
            M = cx.block_mult(i0, i1, i0, i1, "causal")
            _, s, W = _direct_fwd_scores(cx, qc, kc, M)
            den_c = W.sum(-1)
            qf = cx.causal_query_factor(i0, i1)
            if state is not None:
                prep = _causal_qprep(cx, state)
                T, z = _q_scratch_den(cx, qc, prep, state)
                den_c = den_c + (z if qf is None else z * qf.squeeze(-1))
            gd = _grad_aug(cx, g5[:, :, :, i0:i1], o5[:, :, :, i0:i1], den_c)
            gds[:, :, :, i0:i1] = gd
            a, b, c = _direct_bwd(cx, qc, kc, va, M, gd, (s, W))
            if state is not None:
                a = a + _q_bwd(cx, qc, prep, T, gd if qf is None else gd * qf)
            dq[:, :, :, i0:i1] = a
            dk[:, :, i0:i1] += b
            dv[:, :, i0:i1] += c
            if i1 < L:
                state = _causal_update(cx, state, i0, i1)
        dstate = None
        for ci in range(nchunks - 1, -1, -1):  # pass B: reverse order, suffix sums of phi_q^T Gd
            i0 = ci * chunk
            i1 = min(L, i0 + chunk)
            if dstate is not None:
                kprep = _sq_kprep(cx, dstate) if cx.square else _k_prep(cx, dstate, dspace=False)
                _key_side_grads(cx, dk, dv, kprep, i0, i1, cx.causal_key_factor(i0, i1, i1))
            if ci > 0:
                qc = cx.q5[:, :, :, i0:i1]
                qf = cx.causal_query_factor(i0, i1)
                gd = gds[:, :, :, i0:i1]
                if dstate is not None:
                    gam = _decay(cx, chunk)
                    if gam is not None:
                        dstate.mul_(gam)
                if cx.square:  # qf is None (no ALiBi)
                    dstate = _sq_accum(cx, dstate, (qc * cx.fm.r2).reshape(B, Hk, G * (i1 - i0), cx.D),
                                       gd.reshape(B, Hk, G * (i1 - i0), Dv + 1))
                else:
                    dstate = _qstate_accum(cx, dstate, cx.phi(qc, "q"), gd if qf is None else gd * qf)
    return dq.view_as(q), dk, dv


def _qstate_accum(cx, dstate, phq, gd):
    """dstate (cat layout) += sum phq^T gd."""
    if cx.Gs == 1:
        B, Hk, G, C, r = phq.shape
        return _accum(dstate, phq.reshape(B, Hk, G * C, r), gd.reshape(B, Hk, G * C, -1))
    upd = _qstate_tmm(phq, gd, cx.Gs)
    return upd if dstate is None else dstate.add_(upd)


def _qstate_tmm_t(gd, state, Gs):
    """dphi_q = gd @ state^T: gd [B,Hk,G,C,E], state cat [B,Hk,r,Gs*E] -> [B,Hk,G,C,r]."""
    B, Hk, G, C, E = gd.shape
    if Gs == 1:
        return (gd.reshape(B, Hk, G * C, E) @ state.transpose(-1, -2)).view(B, Hk, G, C, -1)
    return gd @ _split(state, Gs).transpose(-1, -2)


def _key_side_grads(cx, dk, dv, kprep, j0, j1, f):
    """dX = phi_k dstate, dphi_k = X dstate^T for keys [j0, j1) with key factor f [B,Hk,Gs,C]|None."""
    Dv, Gs = cx.Dv, cx.Gs
    kc = cx.k[:, :, j0:j1]
    X = _aug(cx.v[:, :, j0:j1], f)
    dX, dkc = _k_consume(cx, kc, kprep, X)  # dX [B, Hk, C, Gs*(Dv+1)]
    dk[:, :, j0:j1] += dkc
    dXv = dX.unsqueeze(-2) if dX.shape[-1] == Dv else dX.view(*dX.shape[:-1], Gs, Dv + 1)[..., :Dv]  # [B,Hk,C,Gs,Dv]
    if f is not None:
        dXv = dXv * f.permute(0, 1, 3, 2).unsqueeze(-1)
    dv[:, :, j0:j1] += dXv.sum(-2)

