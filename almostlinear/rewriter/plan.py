"""Per-site decisions: exact | polynomial | unchanged, from the options and what the matcher proved."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from ..passes.match import AttentionSite
from .options import Options

APPROXIMABLE_MASKS = ("none", "causal", "key_padding", "causal+key_padding", "alibi", "window", "causal+window")


@dataclass
class Decision:
    method: str  # "exact" (fused SDPA), "polynomial" (almostlinear op), "unchanged" (left as it is)
    reason: str
    degree: int | None = None
    coefficients: tuple[float, ...] | None = None  # None: Taylor coefficients of exp


def site_override(module_path: str, options: Options) -> tuple[str, str] | None:
    """The `sites` option entry matching this module path (the last matching glob wins)."""
    found = None
    for pattern, choice in options.sites.items():
        if fnmatch.fnmatchcase(module_path, pattern):
            found = (pattern, choice)
    return found


def decide(site: AttentionSite, module_path: str, options: Options) -> Decision:
    if site.score_transform:  # before any option: neither SDPA nor the op computes softmax(f(s))
        return Decision("unchanged", f"kept as written: {site.score_transform}; neither the fused SDPA call "
                                     f"nor the polynomial op applies it")
    override = site_override(module_path, options)
    if override is not None and override[1] == "skip":
        return Decision("unchanged", f"left as written: sites option {override[0]!r} = 'skip'")
    if override is not None and override[1] == "exact":
        return Decision("exact", f"fused exact: sites option {override[0]!r} = 'exact'")
    wants_poly = options.method in ("polynomial", "auto") or (override is not None and override[1] == "polynomial")
    if options.method == "exact" and override is None:
        return Decision("exact", "fused exact (method='exact')")
    if wants_poly:
        from .approximate import polynomial_support

        ok, why = polynomial_support(site, options)
        if ok:
            return Decision("polynomial", why, degree=options.degree or 2)
        return Decision("exact", f"fused exact: {why}")
    return Decision("exact", "fused exact")
