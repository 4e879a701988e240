"""The names the package shares between its layers: mask kinds and methods, one definition each.

Both are `str` enums: a member equals its string (``MaskKind.CAUSAL == "causal"``), prints as it
(``f"{Method.EXACT}"`` is ``"exact"``) and is written to the report's JSON as it, so users and old
reports keep reading plain strings.
"""
from __future__ import annotations

import enum


class _Name(str, enum.Enum):
    """A str enum that prints and formats as its value (Python 3.10 has no enum.StrEnum)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class MaskKind(_Name):
    """The structure of a site's mask, as the matcher proved it (passes.masks) and the op takes it."""

    NONE = "none"
    CAUSAL = "causal"
    KEY_PADDING = "key_padding"  # a per-key weight [B, S] (padding, or a static set of removed keys)
    CAUSAL_KEY_PADDING = "causal+key_padding"
    ALIBI = "alibi"  # a linear bias slope * (j - i) per head, with or without causal / padding
    WINDOW = "window"  # keys within a band |i - j| <= w (sliding window), with or without padding
    CAUSAL_WINDOW = "causal+window"
    DENSE = "dense"  # anything else: a full [L, S] mask the op cannot take; kept exact

    @property
    def approximable(self) -> bool:
        """Whether the polynomial op covers this kind."""
        return self is not MaskKind.DENSE


# The kinds the polynomial op covers (everything but a dense mask).
APPROXIMABLE_MASK_KINDS = tuple(kind for kind in MaskKind if kind.approximable)


class Method(_Name):
    """What an attention site becomes (a decision, an option's value, a report row's method)."""

    EXACT = "exact"  # fused exact attention (SDPA / the switchable op in exact mode)
    POLYNOMIAL = "polynomial"  # the almostlinear op
    UNCHANGED = "unchanged"  # left as written


class Choice(_Name):
    """What the user may ask for: `method=` (AUTO, EXACT, POLYNOMIAL) and per-site `sites=` (+ SKIP)."""

    AUTO = "auto"
    EXACT = "exact"
    POLYNOMIAL = "polynomial"
    SKIP = "skip"


__all__ = ["MaskKind", "APPROXIMABLE_MASK_KINDS", "Method", "Choice"]
