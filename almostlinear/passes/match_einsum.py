"""Score and value products written as einsum, in any layout of their (batch, head) dims.

    einsum("bhqd,bhkd->bhqk", q, k), einsum("bhqk,bhkd->bhqd", w, v)           # [B, H, T, D]
    einsum("...qhd,...khd->...hqk", q, k), einsum("...hqk,...khd->...qhd", w, v)  # [B, T, H, D]

A product whose operands are not in the site's [batch..., T, D] layout is recorded as a permutation per
operand (`EinsumOperand`); `einsum_layout` then inserts the permutes of q, k and v and records the permute that
brings the site's output back to the einsum's output layout (applied before `unify_layout`; a site whose
path also merges leading dims is refused by `check_einsum_layout`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .graph_utils import is_call, ndim_of
from .match_layout import LayoutInserter
from .site import AttentionSite, NotAttention

_SPEC = re.compile(r"^\s*((?:\.\.\.)?[a-zA-Z]+)\s*,\s*((?:\.\.\.)?[a-zA-Z]+)\s*->\s*((?:\.\.\.)?[a-zA-Z]+)\s*$")


@dataclass
class EinsumOperand:
    """An operand of a site's einsum and the permutation that puts it in the site's layout (None: already is)."""

    node: fx.Node
    perm: tuple | None = None


def _spec(node: Any) -> tuple[list[str], list[fx.Node], int] | None:
    """The three subscripts of a two-operand einsum (a leading `...` in all three or none), its operands and
    the number of dims the `...` stands for (the same in both operands)."""
    if not is_call(node, torch.einsum) or not node.args or not isinstance(node.args[0], str):
        return None
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    m = _SPEC.match(node.args[0].replace(" ", ""))
    if m is None or len(operands) != 2 or not all(isinstance(x, fx.Node) for x in operands):
        return None
    subs = list(m.groups())
    ellipsis = {s.startswith("...") for s in subs}
    if len(ellipsis) != 1:
        return None
    subs = [s.removeprefix("...") for s in subs]
    if any(len(set(s)) != len(s) for s in subs):
        return None
    ranks = [ndim_of(x) for x in operands]
    if None in ranks:
        return None
    extra = {r - len(s) for r, s in zip(ranks, subs[:2])}
    if len(extra) != 1 or min(extra) < 0 or (min(extra) > 0 and not ellipsis.pop()):
        return None
    return subs, operands, extra.pop()


def _perm(letters: str, order: str, extra: int) -> tuple | None:
    """The permutation taking an operand subscripted `letters` to `order` (None: identity)."""
    perm = tuple(range(extra)) + tuple(extra + letters.index(c) for c in order)
    return None if perm == tuple(range(len(perm))) else perm


def _roles(a: str, b: str, out: str) -> tuple[str, str, str, str] | None:
    """(batch, row, column, contracted) letters of a product a, b -> out with out = batch + row + column:
    the row letter only in a, the column letter only in b, one contracted letter in both and not in out."""
    if len(out) < 2:
        return None
    batch, row, col = out[:-2], out[-2], out[-1]
    contracted = set(a) & set(b) - set(out)
    if len(contracted) != 1 or row not in a or row in b or col not in b or col in a:
        return None
    d = contracted.pop()
    if sorted(a) != sorted(batch + row + d) or sorted(b) != sorted(batch + col + d):
        return None
    return batch, row, col, d


def einsum_scores(node: Any) -> tuple[EinsumOperand, EinsumOperand] | None:
    """q and k of a score einsum: batch letters shared, d contracted, output [batch..., q, k]."""
    spec = _spec(node)
    if spec is None:
        return None
    (a, b, out), (q, k), extra = spec
    roles = _roles(a, b, out)
    if roles is None:
        return None
    batch, qi, ki, d = roles
    return EinsumOperand(q, _perm(a, batch + qi + d, extra)), EinsumOperand(k, _perm(b, batch + ki + d, extra))


def einsum_values(node: Any, weights: fx.Node) -> tuple[EinsumOperand, tuple | None] | None:
    """v of a value einsum with the weights [batch..., q, k] first, and the permutation from the site's output
    [batch..., q, e] to the einsum's output (None: the same layout)."""
    spec = _spec(node)
    if spec is None or spec[1][0] is not weights:
        return None
    (w, v, out), (_, value), extra = spec
    batch, qi, ki = w[:-2], w[-2], w[-1]
    e = set(v) - set(w)
    if len(e) != 1 or ki not in v or qi in v or sorted(v) != sorted(batch + ki + "".join(e)):
        return None
    e = e.pop()
    if sorted(out) != sorted(batch + qi + e):
        return None
    site_layout = batch + qi + e
    return EinsumOperand(value, _perm(v, batch + ki + e, extra)), _perm(site_layout, out, extra)


def einsum_layout(site: AttentionSite, inserter: LayoutInserter) -> None:
    """Put q, k, v of an einsum site in the site's layout (permutes) and record the permute of its output."""
    perms = site.einsum_perms
    if not perms:
        return
    for name in ("q", "k", "v"):
        if perms.get(name) is not None:
            setattr(site, name, inserter.method("permute", (getattr(site, name), perms[name])))
    if perms.get("out") is not None:
        site.output_layout.append(("permute", perms["out"]))


def check_einsum_layout(site: AttentionSite) -> None:
    """After `unify_layout`: an einsum permute and a merge of the leading dims on one site are not combined."""
    permuted = any(perm is not None for perm in site.einsum_perms.values())
    if permuted and any(step[0] != "permute" for step in site.output_layout):
        raise NotAttention("an einsum in another layout combined with reshapes of the scores or weights")
