"""ALiBi-shaped biases: per-head slopes m with bias[h, i, j] = m_h * j + c_i on the allowed entries
(`alibi_slopes`), and the test that a static additive tensor is such a bias as a whole (`linear_key_bias`).

A bias m * j differs from m * (j - i) by a per-row constant, which the softmax ignores: BLOOM's baddbmm
bias, the Falcon/MPT bias tensor [H, 1, S] (MPT writes m * (j - (S - 1)), whose far keys are large and
negative) and fairseq's [H, L, S] buffer all give the same slopes.
"""
from __future__ import annotations

import math

import torch


def alibi_slopes(bias, allowed, L, S) -> list[float] | None:
    """Per-head slopes m when bias[..., h, i, j] = m_h * (j - i) + c_i on allowed entries, else None."""
    if bias.dim() < 3:
        bias = bias.reshape(1, L, S)
    heads = bias.reshape(-1, L, S)
    mask = allowed.reshape(-1, L, S) if allowed.dim() >= 3 else allowed.reshape(1, L, S)
    slopes = []
    for h in range(heads.shape[0]):
        m = _row_slope(heads[h], mask[h % mask.shape[0]], S)
        if m is None:
            return None
        slopes.append(m)
    if all(math.isclose(s, 0.0, abs_tol=1e-12) for s in slopes):
        return None
    return slopes


def _row_slope(row: torch.Tensor, m_allowed: torch.Tensor, S: int) -> float | None:
    """The slope m of one head's bias [L, S] = m * j + c_i on allowed entries (0.0 with no allowed pair)."""
    # slope from consecutive allowed pairs in each row; constant per row (c_i) cancels in softmax
    diff = row[:, 1:] - row[:, :-1]
    valid = m_allowed[:, 1:] & m_allowed[:, :-1]
    if not bool(valid.any()):
        return 0.0
    m = float(diff[valid].mean())
    centered = row - m * torch.arange(S, dtype=torch.float32).unsqueeze(0)
    top = torch.where(m_allowed, centered, float("-inf")).amax(dim=1)
    bottom = torch.where(m_allowed, centered, float("inf")).amin(dim=1)
    rows = m_allowed.any(dim=1)
    if not bool(((top - bottom)[rows] <= 1e-4 * (1 + abs(m) * S)).all()):
        return None
    return m


def linear_key_bias(value: torch.Tensor) -> bool:
    """Whether every finite entry of a static additive tensor lies on m_h * j + c_i (-inf entries remove keys):
    then its finite values are an ALiBi bias, however negative (MPT's m * (j - (S - 1)) reaches -m * S), not
    blocking values. A fill mask (0 where allowed, -1e4 / finfo.min elsewhere) is not linear along a row."""
    if value.dim() < 2 or value.shape[-1] < 2 or not bool(value.isfinite().any()):
        return False
    L, S = value.shape[-2:]
    finite = value.isfinite()
    if bool((value.isnan()).any()) or not bool(((value == float("-inf")) | finite).all()):
        return False
    # (all finite entries, including values below BLOCKED_BELOW: a blocking fill breaks the line)
    bias, allowed = torch.where(finite, value, 0.0).reshape(-1, L, S), finite.reshape(-1, L, S)
    rows = sorted({0, L // 2, L - 1})  # a fill mask breaks the line in its first rows: a cheap test first
    if _row_slope(bias[0, rows], allowed[0, rows], S) is None:
        return False
    return alibi_slopes(bias, allowed, L, S) is not None
