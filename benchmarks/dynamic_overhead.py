"""Cost of the run-time crossover under dynamic shapes, below the crossover: a causal attention block compiled
with dynamic=True (Inductor), method="exact" (fused SDPA) against method="auto" (the switchable op, which runs
exact attention below min_seq_len), fwd+bwd at B=4, T=1024, d=256, 4 heads; interleaved, min and median of 7.

    python benchmarks/dynamic_overhead.py
"""
import time, torch, almostlinear
import torch.nn.functional as F
torch.manual_seed(0)
class Block(torch.nn.Module):
    def __init__(s, d=256, h=4):
        super().__init__(); s.qkv = torch.nn.Linear(d, 3*d); s.o = torch.nn.Linear(d, d); s.h = h
    def forward(s, x):
        B, T, C = x.shape
        q, k, v = s.qkv(x).split(C, -1)
        q, k, v = (t.view(B, T, s.h, C // s.h).transpose(1, 2) for t in (q, k, v))
        i = torch.arange(T, device=x.device)
        att = (q @ k.transpose(-2, -1)) / (C // s.h) ** 0.5
        att = att.masked_fill(i[None, :] > i[:, None], float("-inf")).softmax(-1)
        return s.o((att @ v).transpose(1, 2).reshape(B, T, C)) + x
m = Block()
comps = {}
for name, opts in (("exact", dict(method="exact")), ("auto", dict(method="auto"))):
    torch._dynamo.reset()
    c = torch.compile(m, backend=almostlinear.Backend(inner="inductor", **opts), dynamic=True)
    for T in (512, 768):  # warm up both lengths
        c(torch.randn(4, T, 256)).sum().backward()
    comps[name] = c
x = torch.randn(4, 1024, 256)
times = {n: [] for n in comps}
for _ in range(7):
    for n, c in comps.items():
        t0 = time.perf_counter(); c(x).sum().backward(); times[n].append(time.perf_counter() - t0)
for n, t in times.items():
    t.sort(); print(n, "min %.4f median %.4f" % (t[0], t[len(t)//2]))
