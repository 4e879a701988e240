"""Causal (no window, no ALiBi) path of :mod:`almostlinear.kernels.cpu`, batched over groups of chunks.

Same math as the chunked causal recurrence there, but ``GROUP`` chunks of ``chunk`` tokens are processed
per Python step: per-chunk key states Kst_c = phi_k(K_c)^T X_c with one batched matmul, exclusive
prefix sums over the group (plus the carried state), the inter-chunk query terms phi_q(Q_c) P_c with one
batched matmul, and the intra-chunk terms P(s) with a tril mask batched over the group.  The backward
recomputes the prefix states (pass A: den, Gd, dq, the intra-chunk gradients) and then runs reverse
exclusive suffix sums of phi_q^T Gd (pass B: the key-side gradients).  Memory stays linear in n: feature
blocks are GROUP * chunk tokens, states GROUP * r * (Dv + 1).

Inputs whose length is not a multiple of the chunk are zero-padded at the end: padded keys come after
every real query (never seen by them under the causal mask), padded queries get zero gradient.
"""
from __future__ import annotations

import torch

from .features import poly_deriv_eval, poly_eval

GROUP = 4


def _pad(x, L2, dim):
    L = x.shape[dim]
    if L == L2:
        return x
    shape = list(x.shape)
    shape[dim] = L2 - L
    return torch.cat([x, x.new_zeros(shape)], dim)


def _kw_group(cx, t0, t1):
    """key weight of the group as [B, 1, G, C] | None (f for _aug is [B, Hk|1, 1, C])."""
    return None if cx.kw is None else cx.kw[:, t0:t1].to(cx.dt)


def _xaug(cx, t0, t1):
    """X = [kw v | kw] for the group: [B, Hk, T, E]."""
    v = cx.v[:, :, t0:t1]
    ones = torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    va = torch.cat([v, ones], -1)
    kw = _kw_group(cx, t0, t1)
    if kw is None:
        return va, va
    return va * kw[:, None, :, None], va


def _prefix(cx, carry, t0, t1):
    """Exclusive prefix states for the chunks of [t0, t1): P [B, Hk, G, r, E] and the carry after it."""
    B, Hk, C, E = cx.B, cx.Hk, cx.chunk, cx.Dv + 1
    G = (t1 - t0) // C
    X, va = _xaug(cx, t0, t1)
    phk = cx.phi(cx.k[:, :, t0:t1], "k")
    r = phk.shape[-1]
    Kst = torch.matmul(phk.view(B, Hk, G, C, r).transpose(-1, -2), X.view(B, Hk, G, C, E),
                       out=cx.buf("Kst", (B, Hk, G, r, E)))
    P = cx.buf("P", (B, Hk, G, r, E))
    if carry is None:
        P[:, :, 0].zero_()
    else:
        P[:, :, 0].copy_(carry)
    for g in range(1, G):
        torch.add(P[:, :, g - 1], Kst[:, :, g - 1], out=P[:, :, g])
    new = P[:, :, G - 1] + Kst[:, :, G - 1]
    return P, new, X, va


def _scores(cx, qg, kg, kwg):
    """qg [B,Hk,Gq,G,C,D], kg [B,Hk,1,G,C,D] -> s, W (masked) [B,Hk,Gq,G,C,C]."""
    C = qg.shape[-2]
    s = torch.matmul(qg, kg.transpose(-1, -2)).mul_(cx.scale)
    W = poly_eval(s, cx.coeffs)
    mask = torch.ones(C, C, dtype=cx.dt, device=cx.dev).tril_()
    if kwg is not None:
        mask = mask * kwg
    W.mul_(mask)
    return s, W, mask


def _den_inter(cx, q6, P):
    """den column of phi_q(Q_c) P_c for every chunk: q6 [B,Hk,Gq,G,C,D], P [B,Hk,G,r,E] -> [..., C, 1]."""
    p = P[..., cx.Dv]  # [B, Hk, G, r]
    if not cx.quad:
        B, Hk, Gq, G, C, D = q6.shape
        phq = cx.phi(q6, "q")
        return torch.matmul(phq, p.unsqueeze(2).unsqueeze(-1))
    D = q6.shape[-1]
    Mp = cx.fm.unpack(p.unsqueeze(-1), 1.0).squeeze(-1).unsqueeze(2)  # [B, Hk, 1, G, d, d]
    xs = q6 * cx.fm.r2
    z = ((xs @ Mp) * xs).sum(-1, keepdim=True)
    z += (q6 @ p[..., 1:1 + D].unsqueeze(2).unsqueeze(-1)).mul_(cx.fm.c1s)
    z += p[..., :1].unsqueeze(2).unsqueeze(-1).mul(cx.fm.c0)
    return z


def forward(cx, out, den):
    """out [B, Hk, Gq, L, Dv], den [B, Hk, Gq, L] (L a multiple of cx.chunk)."""
    B, Hk, Gq, L, D = cx.q5.shape
    C, Dv, E = cx.chunk, cx.Dv, cx.Dv + 1
    carry = None
    step = C * GROUP
    for t0 in range(0, L, step):
        t1 = min(L, t0 + step)
        G = (t1 - t0) // C
        P, carry, X, va = _prefix(cx, carry, t0, t1)
        qg = cx.q5[:, :, :, t0:t1]
        phq = cx.phi(qg, "q")
        r = phq.shape[-1]
        num = torch.matmul(phq.view(B, Hk, Gq, G, C, r), P.unsqueeze(2))  # [B,Hk,Gq,G,C,E]
        kwg = _kw_group(cx, t0, t1)
        kwg = None if kwg is None else kwg.view(B, 1, 1, G, 1, C)
        _, W, _ = _scores(cx, qg.reshape(B, Hk, Gq, G, C, D), cx.k[:, :, t0:t1].reshape(B, Hk, 1, G, C, D), kwg)
        num.add_(torch.matmul(W, va.view(B, Hk, 1, G, C, E)))
        num = num.view(B, Hk, Gq, G * C, E)
        d = num[..., Dv]
        inv = torch.where(d > 1e-30, 1.0 / d.clamp_min(1e-30), torch.zeros_like(d))
        out[:, :, :, t0:t1] = num[..., :Dv] * inv.unsqueeze(-1)
        den[:, :, :, t0:t1] = d


def backward(cx, g5, o5, dq, dk, dv):
    """g5, o5 [B, Hk, Gq, L, Dv]; accumulates into dq [B,Hk,Gq,L,D], dk, dv [B,Hk,L,.] (zeros)."""
    B, Hk, Gq, L, D = cx.q5.shape
    C, Dv, E = cx.chunk, cx.Dv, cx.Dv + 1
    step = C * GROUP
    gds = g5.new_empty(B, Hk, Gq, L, E)
    carry = None
    starts = list(range(0, L, step))
    for t0 in starts:  # pass A
        t1 = min(L, t0 + step)
        G = (t1 - t0) // C
        P, carry, X, va = _prefix(cx, carry, t0, t1)
        qg = cx.q5[:, :, :, t0:t1]
        r = P.shape[-2]
        kwg = _kw_group(cx, t0, t1)
        kwg = None if kwg is None else kwg.view(B, 1, 1, G, 1, C)
        q6 = qg.reshape(B, Hk, Gq, G, C, D)
        z = _den_inter(cx, q6, P)  # [B,Hk,Gq,G,C,1]
        k6 = cx.k[:, :, t0:t1].reshape(B, Hk, 1, G, C, D)
        s, W, mask = _scores(cx, q6, k6, kwg)
        den = W.sum(-1) + z.squeeze(-1)  # [B,Hk,Gq,G,C]
        inv = torch.where(den > 1e-30, 1.0 / den.clamp_min(1e-30), torch.zeros_like(den)).unsqueeze(-1)
        gc = g5[:, :, :, t0:t1].reshape(B, Hk, Gq, G, C, Dv)
        oc = o5[:, :, :, t0:t1].reshape(B, Hk, Gq, G, C, Dv)
        delta = (gc * oc).sum(-1, keepdim=True)
        gd = torch.cat([gc * inv, -delta * inv], -1)  # [B,Hk,Gq,G,C,E]
        gds[:, :, :, t0:t1] = gd.view(B, Hk, Gq, G * C, E)
        va6 = va.view(B, Hk, 1, G, C, E)
        # intra-chunk gradients
        dW = torch.matmul(gd, va6.transpose(-1, -2)).mul_(mask)
        ds = dW.mul_(poly_deriv_eval(s, cx.coeffs)).mul_(cx.scale)
        dqg = torch.matmul(ds, k6)  # [B,Hk,Gq,G,C,D]
        dkg = torch.matmul(ds.transpose(-1, -2), q6)
        dvg = torch.matmul(W.transpose(-1, -2), gd[..., :Dv])
        if Gq > 1:
            dkg, dvg = dkg.sum(2), dvg.sum(2)
        else:
            dkg, dvg = dkg.squeeze(2), dvg.squeeze(2)
        dk[:, :, t0:t1] += dkg.reshape(B, Hk, G * C, D)
        dv[:, :, t0:t1] += dvg.reshape(B, Hk, G * C, Dv)
        # inter-chunk: dphi_q = gd P^T
        dphi = torch.matmul(gd, P.unsqueeze(2).transpose(-1, -2),
                            out=cx.buf("dphi", (B, Hk, Gq, G, C, r)))
        dqg.add_(cx.fm.vjp(q6, dphi, "q"))
        dq[:, :, :, t0:t1] = dqg.view(B, Hk, Gq, G * C, D)
    carry = None
    for t0 in reversed(starts):  # pass B: reverse exclusive suffix sums of phi_q^T Gd
        t1 = min(L, t0 + step)
        G = (t1 - t0) // C
        qg = cx.q5[:, :, :, t0:t1]
        phq = cx.phi(qg, "q")
        r = phq.shape[-1]
        gd = gds[:, :, :, t0:t1].view(B, Hk, Gq, G, C, E)
        Qst = torch.matmul(phq.view(B, Hk, Gq, G, C, r).transpose(-1, -2), gd)  # [B,Hk,Gq,G,r,E]
        if Gq > 1:
            Qst = Qst.sum(2)
        else:
            Qst = Qst.squeeze(2)
        Dst = cx.buf("Dst", (B, Hk, G, r, E))
        if carry is None:
            Dst[:, :, G - 1].zero_()
        else:
            Dst[:, :, G - 1].copy_(carry)
        for g in range(G - 2, -1, -1):
            torch.add(Dst[:, :, g + 1], Qst[:, :, g + 1], out=Dst[:, :, g])
        carry = Dst[:, :, 0] + Qst[:, :, 0]
        X, va = _xaug(cx, t0, t1)
        kg = cx.k[:, :, t0:t1]
        phk = cx.phi(kg, "k").view(B, Hk, G, C, r)
        dXv = torch.matmul(phk, Dst[..., :Dv])  # [B,Hk,G,C,Dv] (the den column of dX is not needed)
        dphik = torch.matmul(X.view(B, Hk, G, C, E), Dst.transpose(-1, -2),
                             out=cx.buf("dphi", (B, Hk, G, C, r)))
        dk[:, :, t0:t1] += cx.fm.vjp(kg.reshape(B, Hk, G, C, D), dphik, "k").view(B, Hk, G * C, D)
        dXv = dXv.reshape(B, Hk, G * C, Dv)
        kw = _kw_group(cx, t0, t1)
        if kw is not None:
            dXv = dXv * kw[:, None, :, None]
        dv[:, :, t0:t1] += dXv
