"""What the matcher hands on: one `AttentionSite` per attention computation, a `NearMiss` per softmax that
is not one, and `NotAttention`, the exception a matching rule raises with the near-miss reason."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from .graph_utils import shape_of
from .mask_ops import MaskOp, MaskSpec


@dataclass
class AttentionSite:
    """One attention computation in the graph. Shapes follow the graph's layout: [..., T, D]."""

    id: int
    form: str  # "eager" (matmul-softmax chain) or "sdpa"
    q: fx.Node
    k: fx.Node
    v: fx.Node
    output: fx.Node  # the node whose value is the attention output
    chain: list[fx.Node] = field(default_factory=list)  # nodes replaced by the rewrite (eager form)
    mask_ops: list[MaskOp] = field(default_factory=list)
    scale: Any = 1.0  # total multiplicative factor on q.k: float, or a graph node (symbolic / 0-d tensor)
    scale_factors: list = field(default_factory=list)  # (factor, divide) pairs in graph order
    q_factors: list = field(default_factory=list)  # (tensor factor, divide) pairs folded into q (fold_tensor_scale)
    prescale: float = 1.0  # constant factors found on q and k before the matmul (report only)
    mask: MaskSpec = field(default_factory=MaskSpec)
    sdpa_mask: Any = None  # attn_mask of an SDPA call
    is_causal_flag: bool = False  # is_causal of an SDPA call
    dropout_p: Any = 0.0
    dropout_training: Any = True
    enable_gqa: bool = False
    gqa_groups: int = 1
    residual: fx.Node | None = None
    kv_broadcast: tuple | None = None  # (k, v) [B, 1, S, D] of a broadcasting multi-query site
    kv_unrepeated: tuple | None = None  # (k, v) [B, Hk, S, D] before a GQA repeat / MQA broadcast, if any
    constant_scale: float = 1.0  # the constant part of the factor on q.k (symbolic factors: scale_factors)
    score_transform: str = ""  # a transform of the scores the fused ops cannot apply (soft-cap): kept as written
    pre_transform_ops: list[MaskOp] = field(default_factory=list)  # ops before that transform (graph order)
    transform_at: int | None = None  # (while walking up) how many mask ops were recorded after the transform
    cap_nodes: set = field(default_factory=set, repr=False)  # the soft-cap's own scale nodes (not the scale)
    output_layout: list = field(default_factory=list)  # ("flatten", start, end) | ("unsqueeze", dim): site -> graph
    inserted: list[fx.Node] = field(default_factory=list)  # nodes the matcher added (layout conversions)
    einsum_perms: dict = field(default_factory=dict)  # "q"/"k"/"v"/"out" -> permute of an einsum in another layout

    @property
    def anchor(self) -> fx.Node:
        """The node the site is reported at and whose source metadata new nodes copy: its output."""
        return self.output

    @property
    def effective_scale(self) -> float | None:
        if isinstance(self.scale, (int, float)):
            return float(self.scale) * self.prescale
        return None

    @property
    def op_kv(self) -> tuple[fx.Node, fx.Node]:
        """The k and v the polynomial op reads: unrepeated over GQA groups where the matcher found them."""
        return self.kv_unrepeated or (self.k, self.v)

    def scores_shape(self) -> tuple | None:
        """The scores' shape in the site's layout: q's leading dims and query length, k's key length."""
        q, k = shape_of(self.q), shape_of(self.k)
        return None if q is None or k is None else tuple(q[:-1]) + (k[-2],)


@dataclass
class NearMiss:
    node: fx.Node
    reason: str


class NotAttention(Exception):
    """A rule failed; the message is the near-miss reason shown in the report."""
