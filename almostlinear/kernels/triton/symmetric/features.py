"""In-register pieces of the block-symmetric kernels (see the package docstring): dots in the input dtype, the tile
pair of a program, its start state, the tiles of a row block and their outer products (and VJP), the key weight.
Every function is a ``triton.jit`` device function, called by the kernels of sweeps.py and diagonal.py."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, DT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with both operands in DT (the input dtype), fp32 result.  UPCAST (interpreter only: numpy has no
    bf16 matmul): round to DT, then multiply in fp32 -- the same numbers a tensor-core dot gives."""
    a = a.to(DT)
    b = b.to(DT)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def pair(p, NT: tl.constexpr):
    """Tile pair (I, J), I <= J, of pair index p in [0, NT (NT + 1) / 2): rows a and NT-1-a of the upper
    triangle, (NT - a) + (a + 1) = NT + 1 pairs, fold into one row of a [NT / 2, NT + 1] rectangle."""
    if NT == 1:
        I = p * 0
        J = p * 0
    else:
        a = p // (NT + 1)
        r = p % (NT + 1)
        first = r < NT - a
        I = tl.where(first, a, NT - 1 - a)
        J = tl.where(first, a + r, r - 1)  # second row: J = (NT - 1 - a) + (r - (NT - a))
    return I, J


@triton.jit
def program_start(p, c1s, c2s, D: tl.constexpr, T: tl.constexpr, BLOCK_E: tl.constexpr, LIN: tl.constexpr):
    """A sweep program's start: (kv head, value block, I, J, query-side weight, state [F, BLOCK_E] = 0,
    den vector [F] = 0, constant's state [BLOCK_E] = 0) for program p: a tile pair (weight c2 scale^2, doubled off
    the diagonal, F = T*T), or for LIN (p == NP) the linear part (weight c1 scale, F = D; I, J unused)."""
    if LIN:
        I = p * 0
        J = p * 0
        w = c1s + p * 0.0
    else:
        I, J = pair(p, D // T)
        w = tl.where(I == J, c2s, 2.0 * c2s)
    F: tl.constexpr = D if LIN else T * T
    return (tl.program_id(0), tl.program_id(2), I, J, w, tl.zeros((F, BLOCK_E), dtype=tl.float32),
            tl.zeros((F,), dtype=tl.float32), tl.zeros((BLOCK_E,), dtype=tl.float32))


@triton.jit
def load_tiles(X, rows, rm, I, J, D: tl.constexpr, T: tl.constexpr):
    """Tiles I and J of the rows `rows` of X ([N, D] row-major), fp32 [BLOCK, T] each (0 where not rm)."""
    t = tl.arange(0, T)
    base = X + rows[:, None] * D + t[None, :]
    a = tl.load(base + I * T, mask=rm[:, None], other=0.0).to(tl.float32)
    b = tl.load(base + J * T, mask=rm[:, None], other=0.0).to(tl.float32)
    return a, b


@triton.jit
def outer(a, b, BLOCK: tl.constexpr, T: tl.constexpr):
    """Row-wise a (x) b: [BLOCK, T] x [BLOCK, T] -> [BLOCK, T*T] (index a_index * T + b_index)."""
    return tl.reshape(a[:, :, None] * b[:, None, :], (BLOCK, T * T))


@triton.jit
def outer_vjp(d, a, b, BLOCK: tl.constexpr, T: tl.constexpr):
    """d = dL/d(a (x) b) [BLOCK, T*T] -> (dL/da, dL/db), [BLOCK, T] each."""
    d3 = tl.reshape(d, (BLOCK, T, T))
    return tl.sum(d3 * b[:, None, :], 2), tl.sum(d3 * a[:, :, None], 1)


@triton.jit
def load_key_weight(KW, bb, S, cols, cm, HAS_KW: tl.constexpr):
    """f_j for the keys `cols` of batch bb: the key weight (or 1), 0 past the end."""
    if HAS_KW:
        f = tl.load(KW + bb.to(tl.int64) * S + cols, mask=cm, other=0.0).to(tl.float32)
    else:
        f = cm.to(tl.float32)
    return f
