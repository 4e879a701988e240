"""Pure FX passes: normalize spellings, match attention sites, analyse masks, rewrite sites."""
from .match import AttentionSite, NearMiss, find_sites
from .masks import MASK_KINDS, MaskSpec
from .normalize import normalize

__all__ = ["AttentionSite", "NearMiss", "find_sites", "MASK_KINDS", "MaskSpec", "normalize"]
