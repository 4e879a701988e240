import torch


def rms_ratio(a, b):
    """fla-style relative error: rms(a - b) / rms(b)."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-300)).item()


def make_inputs(B=2, Hq=4, Hk=2, L=37, S=None, D=8, Dv=6, dtype=torch.float32, seed=0, kw=False, alibi=False,
                requires_grad=True, std=1.0):
    S = L if S is None else S
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64) * std).to(dtype)
    k = (torch.randn(B, Hk, S, D, generator=g, dtype=torch.float64) * std).to(dtype)
    v = torch.randn(B, Hk, S, Dv, generator=g, dtype=torch.float64).to(dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    key_weight = None
    if kw:
        key_weight = (torch.rand(B, S, generator=g) > 0.3).to(torch.float32)
        key_weight[0, : S // 2] = 0.5  # a non-binary weight
        if B > 1:
            key_weight[-1] = 0.0  # a batch with every key masked -> output 0
    slopes = (torch.rand(Hq, generator=g) * 0.6 - 0.1) if alibi else None
    return q, k, v, key_weight, slopes
