"""Approximate sites: which ones the polynomial op supports, and the rewrite to torch.ops.almostlinear.*"""
from __future__ import annotations

from typing import Any

from ..passes.match import AttentionSite
from ..passes.rewrite import RewriteError
from .options import Options


def polynomial_support(site: AttentionSite, options: Options) -> tuple[bool, str]:
    return False, "the polynomial op is not available yet"


def rewrite_polynomial(gm, site: AttentionSite, fake_mode, options: Options, decision) -> Any:
    raise RewriteError("the polynomial op is not available yet")
