"""Block-symmetric Triton kernels (kernels/triton/symmetric/) on CPU tensors under TRITON_INTERPRET=1, against
the naive reference in float64: outputs and dq, dk, dv, causal and not, key padding (with a batch whose keys are
all masked), GQA, L != S, lengths that are not multiples of CHUNK or the blocks, D in {16, 32, 64}, Dv != D, a
value block smaller than Dv, non-Taylor coefficients, saved vs recomputed state, bf16 and fp16.  Each group runs in a
subprocess (the variable must be set before triton is imported)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import os, sys, time, torch
os.environ["TRITON_INTERPRET"] = "1"
import triton
import triton.language as tl
from almostlinear.kernels.triton import symmetric as sym
from almostlinear.kernels.triton.symmetric import features
from almostlinear.kernels import naive_poly_attention
from tests.kernels.kernel_helpers import make_inputs, rms_ratio

sym.CHUNK, sym.BLOCK_M, sym.BLOCK_N = 32, 16, 16
TAYLOR, OTHER = (1.0, 1.0, 0.5), (0.7, -0.4, 1.3)
GROUPS = {
    # name: causal, kw, (B, Hq, Hk, L, S), D, Dv, coeffs, BLOCK_E
    "global": [
        ("gqa", False, False, (1, 2, 1, 40, 40), 16, 16, TAYLOR, 64),
        ("cross-kw", False, True, (2, 1, 1, 20, 45), 32, 16, OTHER, 64),
        ("cross-blockE", False, False, (1, 2, 1, 37, 53), 16, 32, OTHER, 16),
        ("d64", False, True, (2, 1, 1, 18, 18), 64, 16, TAYLOR, 64),
        ("d128-dv128", False, False, (1, 1, 1, 16, 20), 128, 128, OTHER, 64),
    ],
    "causal": [
        ("gqa-blockE", True, False, (1, 2, 1, 70, 70), 16, 32, TAYLOR, 16),
        ("kw-gqa-d32", True, True, (2, 2, 1, 40, 40), 32, 16, OTHER, 64),
        ("L>S", True, False, (1, 1, 1, 45, 27), 16, 16, OTHER, 64),
        ("L<S", True, True, (2, 1, 1, 27, 45), 16, 16, TAYLOR, 64),
        ("kw-d64", True, True, (2, 1, 1, 40, 40), 64, 16, OTHER, 64),
        ("d128", True, False, (1, 2, 1, 40, 40), 128, 32, TAYLOR, 32),
    ],
    "half": [  # name prefix: the dtype the kernels read
        ("bf16-causal-kw-gqa", True, True, (2, 2, 1, 40, 40), 16, 16, TAYLOR, 64),
        ("bf16-global-d32-blockE", False, False, (1, 1, 1, 36, 36), 32, 32, OTHER, 16),
        ("fp16-causal-d32", True, False, (1, 1, 1, 40, 40), 32, 16, OTHER, 64),
    ],
}


@triton.jit
def _pairs_kernel(OUT, NT: tl.constexpr):
    p = tl.program_id(0)
    i, j = features.pair(p, NT)
    tl.store(OUT + 2 * p, i)
    tl.store(OUT + 2 * p + 1, j)


def check_pairs():
    for nt in (1, 2, 4, 8):
        n = nt * (nt + 1) // 2
        assert sym.pair_count(16 * nt) == n
        got = torch.zeros(n, 2, dtype=torch.int32)
        _pairs_kernel[(n,)](got, NT=nt)
        assert sorted(map(tuple, got.tolist())) == [(i, j) for i in range(nt) for j in range(i, nt)], (nt, got)


def run_case(name, causal, kw, shape, D, Dv, coeffs, block_e, dtype):
    B, Hq, Hk, L, S = shape
    sym.BLOCK_E = block_e
    q, k, v, key_weight, _ = make_inputs(B, Hq, Hk, L, S, D=D, Dv=Dv, dtype=torch.float64, kw=kw)
    # the reference sees the values the kernels see (rounded to dtype)
    q, k, v = (t.detach().to(dtype).double().requires_grad_() for t in (q, k, v))
    scale = D ** -0.5
    ref = naive_poly_attention(q, k, v, scale=scale, coefficients=coeffs, causal=causal, key_weight=key_weight)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rg = torch.autograd.grad(ref, (q, k, v), g)
    c = lambda t: t.detach().to(dtype).contiguous()
    assert sym.supported(c(q), c(v), key_weight, None, 0, 2)
    kwargs = dict(scale=scale, coeffs=coeffs, causal=causal)
    out, den = sym.forward(c(q), c(k), c(v), key_weight, **kwargs)
    assert out.dtype == dtype and den.shape == sym.state_shape(B, Hq, L) and den.dtype == torch.float32
    grads = sym.backward(c(g), c(q), c(k), c(v), out, key_weight, saved_state=den, **kwargs)
    rebuilt = sym.backward(c(g), c(q), c(k), c(v), out, key_weight, **kwargs)
    for a, b, t in zip(grads, rebuilt, (q, k, v)):
        assert a.dtype == dtype and a.shape == t.shape
        assert (a.double() - b.double()).abs().max() <= 1e-6 * b.double().abs().max(), name
    if kw and B > 1:  # the last batch has every key masked: output and gradients 0
        assert (out[-1] == 0).all() and all((t[-1] == 0).all() for t in grads), name
    return [rms_ratio(out, ref)] + [rms_ratio(a, b) for a, b in zip(grads, rg)]


group = sys.argv[1]
t0 = time.time()
if group == "half":
    sym.CHUNK = 16  # CHUNK == BLOCK_M, the relation of the GPU defaults
if group == "global":
    check_pairs()
    assert not sym.supported(torch.zeros(1, 1, 4, 24), torch.zeros(1, 1, 4, 16))  # D = 24
    assert not sym.supported(torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16), None, torch.zeros(1))  # ALiBi
    assert not sym.supported(torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16), None, None, 8)  # window
# bound on rms(kernel - reference) / rms(reference): fp32 (tf32 off: the interpreter multiplies in fp32); bf16 and
# fp16 operands are rounded inside the kernels (features, states, W, Gv) and so are the outputs
BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
failed = []
for case in GROUPS[group]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case[0][:4], torch.float32)
    t1 = time.time()
    errs = run_case(*case, dtype)
    print(case[0], " ".join(f"{e:.2e}" for e in errs), f"{time.time() - t1:.1f}s", flush=True)
    if max(errs) >= BOUNDS[dtype]:
        failed.append((case[0], max(errs), BOUNDS[dtype]))
print(f"{group} in {time.time() - t0:.1f}s", flush=True)
assert not failed, failed
print("OK")
'''


@pytest.mark.parametrize("group", ["global", "causal", "half"])
def test_symmetric_kernels_interpreted_vs_naive(group, tmp_path):
    script = tmp_path / "run_symmetric.py"  # a file, not -c: triton.jit reads the kernel's source
    script.write_text(SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # the child imports the helpers as the module tests.kernels.kernel_helpers of the repository root
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, str(script), group], env=env, cwd=root, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr


COMPILE = r"""
import sys, time
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from almostlinear.kernels.triton import symmetric as sym

PTR = {"bf16": "*bf16", "fp32": "*fp32"}
FLOATS = {"c0", "c1", "c2", "c1s", "c2s", "scale"}


def compile_kernel(fn, ptrs, consts, warps):
    sig = {a: "constexpr" if a in consts else PTR[ptrs[a]] if a in ptrs else "fp32" if a in FLOATS else "i32"
           for a in fn.arg_names}
    t0 = time.time()
    triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=warps, num_stages=sym.NUM_STAGES))
    print(fn.__name__, consts, f"{time.time() - t0:.1f}s", flush=True)


for D, E, dt, causal, kw in [(64, 64, "bf16", True, True), (128, 128, "fp32", False, False)]:
    common = dict(D=D, E=E, CHUNK=sym.CHUNK, BLOCK_M=sym.BLOCK_M, BLOCK_N=sym.BLOCK_N, HAS_KW=kw, PREC="tf32",
                  UPCAST=False)
    sweep = dict(common, T=sym.T, NP=sym.pair_count(D), BLOCK_E=min(sym.BLOCK_E, E), CAUSAL=causal)
    f32 = "fp32"
    for bwd in (False, True):
        compile_kernel(sym.kv_sweep_kernel, dict(Q=dt, K=dt, V=dt, KW=f32, GV=dt if bwd else f32, GDEN=f32,
                                                  NUM=f32, DEN=f32, DQ=f32), dict(sweep, BWD=bwd), sym.SWEEP_WARPS)
    compile_kernel(sym.q_sweep_kernel, dict(Q=dt, K=dt, V=dt, KW=f32, GV=dt, GDEN=f32, DK=f32, DV=f32), sweep,
                   sym.SWEEP_WARPS)
    compile_kernel(sym.diag_fwd_kernel, dict(Q=dt, K=dt, V=dt, KW=f32, NUM=f32, DEN=f32, OUT=dt),
                   dict(common, CAUSAL=causal), sym.DIAG_WARPS)
    compile_kernel(sym.diag_bwd_kernel, dict(Q=dt, K=dt, V=dt, KW=f32, GV=dt, GDEN=f32, DQ=f32, DK=f32, DV=f32),
                   common, sym.DIAG_WARPS)
    compile_kernel(sym.bwd_prep_kernel, dict(GRAD=dt, OUT=dt, DEN=f32, GV=dt, GDEN=f32),
                   dict(E=E, BLOCK_M=sym.BLOCK_M), sym.DIAG_WARPS)
print("OK")
"""


def test_symmetric_kernels_compile_for_sm90(tmp_path):
    """The GPU configuration (module constants) compiles for sm_90 (H100 / H200) without a GPU: Triton's front end,
    its MLIR passes and ptxas.  Catches what the interpreter does not (types, layouts, register allocation)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        if not os.path.exists(get_ptxas(90).path):
            pytest.skip("no ptxas in this triton")
    except Exception as e:  # pragma: no cover - a triton without the nvidia backend
        pytest.skip(f"no nvidia backend: {e}")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "compile_symmetric.py"
    script.write_text(COMPILE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), TRITON_DEFAULT_FP_FUSION="1",
               TRITON_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, str(script)], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr
