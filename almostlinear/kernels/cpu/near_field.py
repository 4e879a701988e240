"""The exact window's correction (kernels/exact_window.py has the math): on the keys near each query, the weight
P(s) the polynomial op gave is replaced by exp(s).

For queries i and the keys j of their near band (causal: i - W < j <= i; otherwise |i - j| < W; intersected
with the op's own mask), with l'_ij = log of the op's multiplier of W_ij in the polynomial kernel's scale
(ALiBi m (j - i) + the regime's per-row log-scale c_i + log key_weight_j; -inf where not allowed),
l_ij = s_ij + l'_ij and a per-row shift t_i:

    E_ij = exp(l_ij - t_i),   Pn_ij = P(s_ij) exp(l'_ij - t_i),   C_ij = E_ij - Pn_ij   (the correction weight)

The queries are cut into chunks of ``C`` tokens; a chunk's band is the same run of key offsets for every chunk
(keys padded by ``pad`` zero-weight positions on the sides it needs, ``pad`` a multiple of C), so a block of g
chunks reads its bands as one strided view of the padded keys and the mask of relative offsets is shared:
scores [B, Hk, g, G*C, U] (U = C + pad, or C + 2 pad without causal) from one batched matmul.  The backward
adds each band's key gradients back chunk by chunk (U / C aligned pieces, none overlapping within one add).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..features import evaluate_polynomial, evaluate_polynomial_derivative
from ..key_mask import allowed_key_block

ROWS = 4096  # query rows (B * Hq * tokens) per block


class Bands(NamedTuple):
    """The padded layout of one call: chunk C, front/back padding, chunks nc, band width U."""

    C: int
    front: int
    back: int
    nc: int
    U: int


def layout(L: int, S: int, exact_window: int, causal: bool) -> Bands:
    C = 16  # 16-32 measured within ~10% of each other at W = 64, n = 32k; 64 was ~30% slower
    pad = -(-(exact_window - 1) // C) * C
    nc = -(-L // C)
    back = (0 if causal else pad) + nc * C - S  # the last chunk's band ends at nc C (+ pad)
    return Bands(C, pad, max(0, back), nc, C + pad + (0 if causal else pad))


def _relative_log_mask(bands: Bands, causal: bool, window: int, exact_window: int, alibi, Hk: int, G: int, dt, dev):
    """[Hk|1, G|1, C, U]: 0 (+ ALiBi m (j - i)) where key offset u of query r is near and allowed, else -inf."""
    r = torch.arange(bands.C, device=dev).unsqueeze(-1)
    j = torch.arange(bands.U, device=dev).unsqueeze(0) - bands.front  # relative to the chunk's first query
    rel = j - r  # j - i
    # near (the exact window's rule is the op's window rule) and allowed by the site's own mask
    near = allowed_key_block(r, j, causal, exact_window) & allowed_key_block(r, j, causal, window)
    out = torch.zeros(bands.C, bands.U, dtype=dt, device=dev).masked_fill(~near, float("-inf"))
    if alibi is None:
        return out.view(1, 1, bands.C, bands.U)
    return out + alibi.to(dt).view(Hk, G, 1, 1) * rel.to(dt)


class NearField:
    """One call's padded inputs and per-block views.  q [B, Hq, L, D], k [B, Hk, S, D], v [B, Hk, S, Dv]
    (contiguous, compute dtype), key_weight [B, S] | None, alibi [Hq] | None, log_scale [Hq, L] | None (the
    polynomial kernel's per-row log-scale c_i, see exact_window.kernel_log_scale)."""

    def __init__(self, q, k, v, key_weight, alibi, log_scale, *, scale, coeffs, causal, window, exact_window):
        self.B, self.Hq, self.L, self.D = q.shape
        self.Hk, self.S, self.Dv = k.shape[1], k.shape[2], v.shape[-1]
        self.G = self.Hq // self.Hk
        self.scale, self.coeffs = scale, tuple(coeffs)
        self.bands = bd = layout(self.L, self.S, exact_window, causal)
        dt, dev = q.dtype, q.device
        Lp = bd.nc * bd.C
        # scale q, chunk-first: [B, Hk, nc, G*C, D] (one copy where L is a multiple of C and G = 1)
        qs = q * scale
        q5 = (qs if Lp == self.L else F.pad(qs, (0, 0, 0, Lp - self.L))).view(self.B, self.Hk, self.G, bd.nc, bd.C,
                                                                             self.D)
        self.qc = q5.transpose(2, 3).reshape(self.B, self.Hk, bd.nc, self.G * bd.C, self.D)
        self.kp, self.vp = _padded(k, bd.front, bd.back), _padded(v, bd.front, bd.back)
        kw = torch.ones(self.B, self.S, dtype=dt, device=dev) if key_weight is None else key_weight.to(dt)
        logw = _log(kw)
        self.logw = F.pad(logw, (bd.front, bd.back), value=float("-inf"))  # [B, Sp]: pads never count
        self.rel = _relative_log_mask(bd, causal, window, exact_window, alibi, self.Hk, self.G, dt, dev)
        h = self.rel.shape[0]
        self.rel = self.rel.expand(h, self.G, bd.C, bd.U).reshape(1, h, 1, self.G * bd.C, bd.U)
        # [1, 1, G*C, U]: where a band's score is set to 0 (a NaN or inf key outside a query's band must not reach
        # it); not needed when every key is finite (keys of weight 0 were zeroed by the op, pads are 0)
        # (a finite sum of k: every key finite; an overflow to inf only costs the mask)
        self.outside = None if bool(torch.isfinite(k.sum())) else self.rel[0, :1] == float("-inf")
        self.log_scale = None if log_scale is None else self.chunked(log_scale.to(dt).expand(1, self.Hq, self.L))[0]
        self.g = max(1, ROWS // max(1, self.B * self.Hq * bd.C))
        # rows with no allowed key outside their window (causal i < W, ...): their weights are all exact; the
        # polynomial part is left out there instead of subtracted (den_p - sum P(s) would cancel to round-off,
        # and a row of very negative logits would lose its exact weights e^s under it)
        far = far_rows(self.L, self.S, causal, window, exact_window, key_weight, dev)  # [B|1, L]
        no_far = torch.zeros(far.shape, dtype=dt, device=dev).masked_fill_(~far, float("inf"))
        # [B|1, Hk, nc, G*C]: +inf on the rows with no far key
        self.no_far = self.chunked(no_far.unsqueeze(1).expand(far.shape[0], self.Hq, self.L))

    def chunked(self, x, fill=0.0):
        """[B, Hq, L(, X)] -> chunk-first rows [B, Hk, nc, G*C(, X)] (a copy; padded rows ``fill``)."""
        bd, extra = self.bands, x.shape[3:]
        x = x.unsqueeze(-1) if not extra else x
        x = F.pad(x, (0, 0, 0, bd.nc * bd.C - self.L), value=fill)
        x = x.view(x.shape[0], self.Hk, self.G, bd.nc, bd.C, -1).transpose(2, 3)
        x = x.reshape(x.shape[0], self.Hk, bd.nc, self.G * bd.C, -1)
        return x if extra else x.squeeze(-1)

    def unchunk(self, x):
        """Inverse of :meth:`chunked`: [B, Hk, nc, G*C(, X)] -> [B, Hq, L(, X)]."""
        bd, extra = self.bands, x.dim() == 5
        x = x if extra else x.unsqueeze(-1)
        x = x.reshape(self.B, self.Hk, bd.nc, self.G, bd.C, -1).transpose(2, 3)
        x = x.reshape(self.B, self.Hq, bd.nc * bd.C, -1)[:, :, :self.L]
        return x if extra else x.squeeze(-1)

    def blocks(self):
        for c0 in range(0, self.bands.nc, self.g):
            yield c0, min(self.bands.nc, c0 + self.g)

    def band(self, t, c0, c1):
        """The bands of chunks c0..c1 of a padded [B, Hk, Sp, X] tensor: [B, Hk, g, U, X] (a strided view)."""
        C, U = self.bands.C, self.bands.U
        return t.narrow(2, c0 * C, (c1 - c0 - 1) * C + U).unfold(2, U, C).transpose(-1, -2)

    def logits(self, c0, c1):
        """(s, l') of chunks c0..c1: [B, Hk, g, G*C, U]; l' (broadcastable to s) is -inf where a key is not near
        or not allowed, and s is 0 at the keys outside the band's relative mask (a NaN key there must not reach
        the row; keys of weight 0 and the pads are zero already)."""
        C, U = self.bands.C, self.bands.U
        kb = self.band(self.kp, c0, c1)
        s = self.qc[:, :, c0:c1] @ kb.transpose(-1, -2)
        if self.outside is not None:
            s.masked_fill_(self.outside, 0.0)
        logw = self.logw.narrow(1, c0 * C, (c1 - c0 - 1) * C + U).unfold(1, U, C)  # [B, g, U]
        lp = self.rel + logw[:, None, :, None, :]
        if self.log_scale is not None:
            lp = lp + self.log_scale[:, c0:c1].unsqueeze(0).unsqueeze(-1)
        return s, lp

    def weights(self, s, lp, t, c0, c1, x=None):
        """(E, F) given the row shift t [B, Hk, g, G*C]: E = exp(s + l' - t) and F = exp(l' - t), both 0 where a
        key is not near or not allowed (l' = -inf); F is 0 on the rows with no far key.  ``x``: s + l', if the
        caller has it (overwritten)."""
        t = t.unsqueeze(-1)
        x = torch.add(s, lp) if x is None else x
        return x.sub_(t).exp_(), torch.exp(lp - (t + self.no_far[:, :, c0:c1].unsqueeze(-1)))


def far_rows(L, S, causal, window, exact_window, key_weight, device):
    """[B|1, L] bool: whether query i has a key outside its exact window that it may see and whose weight is not 0
    (a running count of the kept keys read at both ends of each far range): a left-padded row whose only far keys
    are padding has none."""
    kept = torch.ones(1, S, device=device) if key_weight is None else (key_weight > 0).to(torch.float32)
    count = torch.nn.functional.pad(kept.cumsum(-1), (1, 0))  # count[:, j] = kept keys before j

    def kept_between(lo, hi):  # kept keys in [lo, hi] (inclusive; none where hi < lo)
        a, b = lo.clamp(0, S), (hi + 1).clamp(0, S)
        return torch.where(b > a, count[:, b] - count[:, a], 0.0)

    i = torch.arange(L, device=device)
    lo = (i - window + 1) if window else torch.zeros_like(i)
    far = kept_between(lo, i - exact_window)
    if not causal:
        far = far + kept_between(i + exact_window, (i + window - 1) if window else torch.full_like(i, S - 1))
    return far > 0


def _padded(x, front, back):
    """x [B, H, S, X] with `front` and `back` zero rows along S (only the pads are zero-filled: a full fill of a
    fresh multi-MB tensor costs as much as the copy)."""
    out = x.new_empty(x.shape[0], x.shape[1], front + x.shape[2] + back, x.shape[3])
    out[:, :, :front].zero_()
    out[:, :, front + x.shape[2]:].zero_()
    out[:, :, front:front + x.shape[2]].copy_(x)
    return out


def _tiny(t):
    return torch.finfo(t.dtype).tiny


def _log(x):
    """log x, -inf where x <= 0."""
    return torch.where(x > 0, x.clamp_min(_tiny(x)).log(), float("-inf"))


def reciprocal(x):
    return torch.where(x > _tiny(x), 1.0 / x.clamp_min(_tiny(x)), 0.0)


def kept_size(B, Hq, Hk, L, S, exact_window, causal, itemsize, limit_mib) -> int:
    """Elements of the band weights the forward keeps for the backward (corr and d corr / d s per block, see
    :func:`near_forward`), or 0 where they exceed ``limit_mib`` MiB.  Arithmetic only (the fake kernel's)."""
    bd = layout(L, S, exact_window, causal)
    numel = 2 * B * Hq * bd.nc * bd.C * bd.U
    return numel if numel * itemsize <= limit_mib * 2 ** 20 else 0


def _kept_blocks(nf, kept):
    """Per block (c0, c1): the views [2, B, Hk, g, G*C, U] of a flat kept tensor (each block one contiguous run)."""
    off, views = 0, {}
    for c0, c1 in nf.blocks():
        n = 2 * nf.B * nf.Hk * (c1 - c0) * nf.G * nf.bands.C * nf.bands.U
        views[c0] = kept[off:off + n].view(2, nf.B, nf.Hk, c1 - c0, nf.G * nf.bands.C, nf.bands.U)
        off += n
    return views


def near_forward(nf: NearField, out_poly, den_poly, kept=None):
    """Combine the polynomial op's out [B, Hq, L, Dv] and den [B, Hq, L] (in the kernel's scale) with the near
    keys' correction.  Returns out [B, Hq, L, Dv] and, [B, Hq, L] each, the row shift t, the combined denominator
    den' and the polynomial part's a = den_p e^{-t} (both in the scale e^{-t}; a = 0 on rows with no far key).
    ``kept`` (flat, :func:`kept_size` elements): filled with each block's corr and d corr / d s = E - P'(s) F, so
    that the backward reads them instead of recomputing the band's scores and weights."""
    views = None if kept is None else _kept_blocks(nf, kept)
    log_den = nf.chunked(_log(den_poly), float("-inf")) - nf.no_far  # a = 0 on the rows with no far key
    outp = nf.chunked(out_poly)
    num = torch.empty_like(outp)
    t_all, den_all, a_all = torch.empty_like(log_den), torch.empty_like(log_den), torch.empty_like(log_den)
    for c0, c1 in nf.blocks():
        s, lp = nf.logits(c0, c1)
        ld = log_den[:, :, c0:c1]
        # the largest log-weight: exact (s + l'), polynomial (log den_p; l' for the band's P(s) terms, which
        # cancel against den_p: only on rows that have far keys)
        x = torch.add(s, lp)
        t = torch.maximum(torch.maximum(ld, x.amax(-1)), lp.amax(-1) - nf.no_far[:, :, c0:c1])
        t = torch.where(torch.isfinite(t), t, 0.0)
        E, F_ = nf.weights(s, lp, t, c0, c1, x)
        if views is None:
            corr = E.sub_(evaluate_polynomial(s, nf.coeffs).mul_(F_))
        else:
            corr, slope = views[c0].unbind(0)
            torch.sub(E, torch.mul(evaluate_polynomial_derivative(s, nf.coeffs), F_, out=slope), out=slope)
            torch.sub(E, torch.mul(evaluate_polynomial(s, nf.coeffs), F_, out=corr), out=corr)
        a = torch.exp(ld - t)  # den_poly e^{-t}; 0 where den_poly is 0
        num[:, :, c0:c1] = torch.addcmul(corr @ nf.band(nf.vp, c0, c1), a.unsqueeze(-1), outp[:, :, c0:c1])
        den_all[:, :, c0:c1] = a + corr.sum(-1)
        t_all[:, :, c0:c1] = t
        a_all[:, :, c0:c1] = a
    out = nf.unchunk(num.mul_(reciprocal(den_all).unsqueeze(-1)))
    return out if out.is_contiguous() else out.contiguous(), nf.unchunk(t_all), nf.unchunk(den_all), nf.unchunk(a_all)


def near_backward(nf: NearField, grad, out, t, den, kept=None):
    """dq [B, Hq, L, D], dk, dv of the correction, given the combined out and the forward's t and den'
    ([B, Hq, L]) and its kept band weights (None: recomputed).  The polynomial part's gradients are the polynomial
    op's backward with grad alpha * G and the combined out (exact_window.py)."""
    views = None if kept is None else _kept_blocks(nf, kept)
    inv = nf.chunked(reciprocal(den)).unsqueeze(-1)
    gs = nf.chunked(grad) * inv                                   # G / den'
    delta = (gs * nf.chunked(out)).sum(-1, keepdim=True)          # G . out / den'
    tc = nf.chunked(t)
    dq = torch.empty_like(nf.qc)  # every block writes its rows
    dkp, dvp = torch.zeros_like(nf.kp), torch.zeros_like(nf.vp)
    for c0, c1 in nf.blocks():
        if views is None:
            s, lp = nf.logits(c0, c1)
            E, F_ = nf.weights(s, lp, tc[:, :, c0:c1], c0, c1)
            corr = E - evaluate_polynomial(s, nf.coeffs).mul_(F_)
            slope = E.sub_(evaluate_polynomial_derivative(s, nf.coeffs).mul_(F_))  # d corr / d s = E - P'(s) F
        else:
            corr, slope = views[c0].unbind(0)
        kb, vb = nf.band(nf.kp, c0, c1), nf.band(nf.vp, c0, c1)
        g = gs[:, :, c0:c1]
        dcorr = (g @ vb.transpose(-1, -2)).sub_(delta[:, :, c0:c1])
        ds = dcorr.mul_(slope)  # dL/ds / scale
        dq[:, :, c0:c1] = (ds @ kb).mul_(nf.scale)
        _add_bands(nf, dkp, ds.transpose(-1, -2) @ nf.qc[:, :, c0:c1], c0, c1)  # qc is scale q
        _add_bands(nf, dvp, corr.transpose(-1, -2) @ g, c0, c1)
    front = nf.bands.front
    return nf.unchunk(dq), dkp[:, :, front:front + nf.S], dvp[:, :, front:front + nf.S]


def _add_bands(nf, dst, bands, c0, c1):
    """dst [B, Hk, Sp, X] += the band gradients [B, Hk, g, U, X] of chunks c0..c1 (overlapping bands added piece by
    piece: piece p of chunk c covers keys (c + p) C .. (c + p + 1) C of the padded axis)."""
    C = nf.bands.C
    for p in range(nf.bands.U // C):
        view = dst.narrow(2, (c0 + p) * C, (c1 - c0) * C).unflatten(2, (c1 - c0, C))
        view += bands[:, :, :, p * C:(p + 1) * C]
