"""Pure FX passes: normalize spellings, match attention sites, analyse masks, rewrite sites."""
from .masks import MaskSpec
from .match import AttentionSite, NearMiss, find_sites
from .normalize import normalize

__all__ = ["AttentionSite", "NearMiss", "find_sites", "MaskSpec", "normalize"]
