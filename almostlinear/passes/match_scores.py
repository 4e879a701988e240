"""Walking up from the softmax (`match_scores`): through scale factors, masks, casts, layout steps and
score transforms to the score matmul (`q @ k^T`, an einsum, or baddbmm), recording each op on the site;
and the site's total scale on q.k (`total_scale`)."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .graph_utils import arg, example_value, is_call, is_number, tensor_meta
from .mask_ops import MaskOp
from .match_einsum import einsum_scores
from .match_layout import LayoutInserter
from .match_rules import (baddbmm_operands, is_cast, is_layout_step, is_scalar, last_two_dims_swapped,
                          op_name, other_uses, per_head_factor)
from .normalize import MASKED_FILL, MATMUL, TANH, WHERE
from .site import AttentionSite, NotAttention

# ---------------------------------------------------------------------------------------------------
# Score transforms the fused ops cannot apply: recognised, recorded, kept as written
# ---------------------------------------------------------------------------------------------------


def _is_clamp(node: Any) -> bool:
    return is_call(node, torch.clamp, torch.clip, "clamp", "clip")


def _is_transform(node: Any) -> bool:
    return is_call(node, TANH) or _is_clamp(node)


def _number(value: Any) -> str:
    return f"{value:g}" if is_number(value) else "c"


def _clamp_description(node: fx.Node) -> str:
    low, high = arg(node, 1, "min"), arg(node, 2, "max")
    return (f"clamped scores (clamp(s, {_number(low) if low is not None else '-'}, "
            f"{_number(high) if high is not None else '-'}))")


def _soft_cap_description(node: fx.Node, site: AttentionSite) -> str:
    """`tanh(s / a) * b`: the scale ops around the tanh belong to the cap (`site.cap_nodes`), not to q.k."""
    outer, inner = 1.0, 1.0
    last = site.mask_ops[-1] if site.mask_ops else None
    if last is not None and last.kind == "scale" and node in last.node.all_input_nodes:
        outer = (1 / last.value if last.divide else last.value) if is_number(last.value) else None
        site.cap_nodes.add(last.node)
    x = node.args[0]
    if is_call(x, operator.mul, operator.truediv) and len(x.users) == 1:
        a, b = x.args
        factor = b if isinstance(a, fx.Node) and is_scalar(b) else a if x.target is operator.mul else None
        if factor is not None and is_scalar(factor) and factor is not x:
            site.cap_nodes.add(x)
            inner = (factor if x.target is operator.truediv else 1 / factor) if is_number(factor) else None
    return f"soft-capped scores (tanh(s / {_number(inner)}) * {_number(outer)})"


def _record_transform(node: fx.Node, site: AttentionSite) -> None:
    """A soft-cap `tanh(s / a) * b` or a `clamp`.

    The ops recorded so far were applied after the transform (the walk goes up from the softmax): they are
    the site's masks. What comes further up was applied before it (`pre_transform_ops`).
    """
    if site.transform_at is None:  # the transform nearest the softmax delimits the masks
        site.transform_at = len(site.mask_ops)
    desc = _clamp_description(node) if _is_clamp(node) else _soft_cap_description(node, site)
    site.score_transform = f"{site.score_transform} and {desc}" if site.score_transform else desc


# ---------------------------------------------------------------------------------------------------
# One op between the score matmul and the softmax
# ---------------------------------------------------------------------------------------------------


def _factor(value: Any) -> bool:
    """A scale factor: a scalar, or a tensor constant over the query and key dims (per head: a learned temperature
    [H, 1, 1], cosine attention's exp(logit_scale)); a tensor factor is folded into q (`fold_tensor_scale`)."""
    return is_scalar(value) or per_head_factor(value)


def _scale_step(node: fx.Node, site: AttentionSite) -> fx.Node:
    """scores * c, c * scores or scores / c with a scalar or per-head c: recorded as a scale op."""
    a, b = node.args
    divide = node.target is operator.truediv
    if not divide and _factor(a) and isinstance(b, fx.Node) and not (_factor(b) and came_from_matmul(a)):
        a, b = b, a  # c * scores
    if isinstance(a, fx.Node) and _factor(b) and not (divide and _factor(a) and not came_from_matmul(a)):
        site.mask_ops.append(MaskOp("scale", node, value=b, divide=divide))
        return a
    raise NotAttention(f"scores {'divided' if divide else 'multiplied'} by a tensor that is not a scalar and "
                       f"not constant over the query and key dims (a per-head factor [..., H, 1, 1] is seen)")


def _mask_step(node: fx.Node, site: AttentionSite) -> fx.Node | None:
    """scores + term, masked_fill or a where with the scores on one side: recorded as a mask op."""
    if is_call(node, operator.add):
        a, b = node.args
        scores, term = (a, b) if came_from_matmul(a) else (b, a)
        if not isinstance(term, fx.Node) and not is_number(term):
            raise NotAttention("scores added to an unsupported value")
        site.mask_ops.append(MaskOp("add", node, tensor=term))  # (a constant shift cancels in the softmax)
        return scores
    if is_call(node, MASKED_FILL):
        scores, cond, value = node.args
        site.mask_ops.append(MaskOp("fill", node, tensor=cond, value=value))
        return scores
    if is_call(node, WHERE) and len(node.args) == 3:
        cond, a, b = node.args
        if came_from_matmul(a) and not came_from_matmul(b):
            site.mask_ops.append(MaskOp("keep", node, tensor=cond, value=b))
            return a
        if came_from_matmul(b) and not came_from_matmul(a):
            site.mask_ops.append(MaskOp("fill", node, tensor=cond, value=a))
            return b
    return None


def _score_step(node: fx.Node, site: AttentionSite) -> fx.Node | None:
    """One op between the score matmul and the softmax; returns its score operand, or None at the matmul."""
    if is_call(node, MATMUL):
        return None
    if is_cast(node) or is_layout_step(node):
        return node.args[0]
    if _is_transform(node):
        _record_transform(node, site)
        return node.args[0]
    if is_call(node, operator.mul, operator.truediv):
        return _scale_step(node, site)
    scores = _mask_step(node, site)
    if scores is None:
        raise NotAttention(f"scores are transformed by `{op_name(node)}` before the softmax (not plain attention)")
    return scores


def came_from_matmul(node: Any, depth: int = 24) -> bool:
    """Whether `node` is on the score path: reaches a score matmul through score-preserving ops only
    (casts, layout steps, scale multiplications/divisions, mask additions, masked_fill, the kept branch of a
    where, and the recognised score transforms)."""
    if not isinstance(node, fx.Node) or depth == 0:
        return False
    if is_call(node, MATMUL) or einsum_scores(node) is not None or baddbmm_operands(node) is not None:
        return True
    if is_cast(node) or is_layout_step(node) or _is_transform(node) or is_call(node, operator.truediv, MASKED_FILL):
        operands = node.args[:1]  # scores / c, scores.masked_fill(..), scores.view(..), tanh(scores)
    elif is_call(node, operator.mul, operator.add):  # either side: c * scores, bias + scores
        operands = node.args[:2]
    elif is_call(node, WHERE):  # where(mask, scores, fill) or where(mask, fill, scores)
        operands = node.args[1:3]
    else:
        return False
    return any(came_from_matmul(x, depth - 1) for x in operands)


# ---------------------------------------------------------------------------------------------------
# The walk
# ---------------------------------------------------------------------------------------------------


def _baddbmm_ops(node: fx.Node, operands: tuple, site: AttentionSite) -> None:
    """BLOOM-style scores: alibi.baddbmm(q, k^T, beta=beta, alpha=scale) adds beta * bias and scales q.k."""
    bias, _, _, beta, alpha = operands
    if not is_number(beta) or not is_scalar(alpha):
        raise NotAttention("baddbmm with a non-constant beta or a tensor alpha")
    if beta != 0:
        site.mask_ops.append(MaskOp("add", node, tensor=bias, value=float(beta)))
    site.mask_ops.append(MaskOp("scale", node, value=float(alpha) if is_number(alpha) else alpha))


def _key_scale(b: Any, site: AttentionSite, chain: list) -> Any:
    """`q @ (k^T / c)` or `q @ (k^T * c)` with a scalar c (a 0-d tensor included): the factor scales q.k."""
    while is_call(b, operator.mul, operator.truediv) and len(b.users) == 1:
        x, c = b.args
        divide = b.target is operator.truediv
        if not divide and is_scalar(x) and isinstance(c, fx.Node):
            x, c = c, x
        if not (isinstance(x, fx.Node) and is_scalar(c)) or is_scalar(x):
            break
        site.mask_ops.append(MaskOp("scale", b, value=c, divide=divide))
        chain.append(b)
        b = x
    return b


def _score_matmul(node: fx.Node, site: AttentionSite, chain: list, baddbmm: tuple | None) -> None:
    """The score product q @ k^T (or baddbmm's): its operands are the site's q and k."""
    a, b = baddbmm[1:3] if baddbmm else node.args
    b = _key_scale(b, site, chain)
    if not isinstance(b, fx.Node) or not last_two_dims_swapped(b):
        desc = b.format_node() if isinstance(b, fx.Node) else repr(b)
        raise NotAttention(f"key operand is not a swap of the last two dims ({desc[:80]})")
    site.q, site.k = a, b.args[0]
    if len(b.users) == 1:
        chain.append(b)


def _walk_to_matmul(softmax: fx.Node, site: AttentionSite) -> list[fx.Node]:
    """The score nodes from the softmax's input up to the score matmul, recording their ops on the site."""
    node, chain = softmax.args[0], []
    while True:
        if not isinstance(node, fx.Node):
            raise NotAttention("softmax input is not a tensor computed in the graph")
        if len(node.users) != 1:
            user = chain[-1] if chain else softmax
            raise NotAttention(f"scores are used outside the site: also read by {other_uses(node, user)}")
        chain.append(node)
        einsum = einsum_scores(node)
        if einsum is not None:
            (site.q, q_perm), (site.k, k_perm) = ((x.node, x.perm) for x in einsum)
            site.einsum_perms.update(q=q_perm, k=k_perm)
            return chain
        baddbmm = baddbmm_operands(node)
        if baddbmm is not None:
            _baddbmm_ops(node, baddbmm, site)
        upstream = None if baddbmm else _score_step(node, site)
        if upstream is None:
            _score_matmul(node, site, chain, baddbmm)
            return chain
        node = upstream


def match_scores(softmax: fx.Node, site: AttentionSite) -> None:
    """Set the site's q, k and mask ops (graph order; those before a score transform apart) from the scores."""
    site.chain.extend(_walk_to_matmul(softmax, site))
    site.mask_ops.reverse()  # graph order: first applied first
    if site.transform_at is not None:  # masks are the ops after the (last) transform; the rest came before it
        split = len(site.mask_ops) - site.transform_at
        before, after = site.mask_ops[:split], site.mask_ops[split:]
        site.pre_transform_ops = [op for op in before if op.node not in site.cap_nodes]
        site.mask_ops = [op for op in after if op.node not in site.cap_nodes]


# ---------------------------------------------------------------------------------------------------
# The factor on q.k
# ---------------------------------------------------------------------------------------------------


def _peel_constant_scale(node: fx.Node) -> tuple[fx.Node, float]:
    """q = q0 * c (or / c) with a Python constant c: report the factor (the graph keeps it)."""
    factor = 1.0
    while is_call(node, operator.mul, operator.truediv):
        a, b = node.args
        if isinstance(a, fx.Node) and is_number(b):
            factor *= (1.0 / b) if node.target is operator.truediv else float(b)
            node = a
        elif isinstance(b, fx.Node) and is_number(a) and node.target is operator.mul:
            factor *= float(a)
            node = b
        else:
            break
    return node, factor


def total_scale(site: AttentionSite) -> None:
    """The site's scale: the product of its scale ops (a soft-cap's own factors are in none of them), split
    into the constant part, the symbolic factors and the tensor factors (0-d or per head, folded into q by
    `fold_tensor_scale`); and the constant factors found on q and k (report)."""
    constant, symbolic, tensors = 1.0, [], []
    for op in site.pre_transform_ops + site.mask_ops:
        if op.kind != "scale":
            continue
        if is_number(op.value):
            constant = constant / op.value if op.divide else constant * op.value
        elif isinstance(example_value(op.value), torch.Tensor):
            tensors.append((op.value, op.divide))
        else:
            symbolic.append((op.value, op.divide))
    site.scale_factors, site.q_factors = symbolic, tensors
    site.scale = constant if not symbolic and not tensors else None
    site.constant_scale = constant
    site.prescale = _peel_constant_scale(site.q)[1] * _peel_constant_scale(site.k)[1]


def fold_tensor_scale(site: AttentionSite, inserter: LayoutInserter) -> None:
    """Tensor factors on the scores (a learned per-head temperature, cosine attention's exp(logit_scale), a 0-d
    tensor) are applied to q: (q * t) . k = t * (q . k) for t constant over queries and keys. The site's q is
    then the scaled q, so the exact rewrite is SDPA at the constant scale and calibration sees the true logits."""
    if not site.q_factors:
        return
    q, want = site.q, tensor_meta(site.q)
    for factor, divide in site.q_factors:
        q = inserter.method("div" if divide else "mul", (q, factor))
    got = tensor_meta(q)
    if got is None or want is None or tuple(got.shape) != tuple(want.shape):
        raise NotAttention(f"scores scaled by a tensor of shape {tuple(example_value(site.q_factors[0][0]).shape)} "
                           f"that does not broadcast over q {tuple(want.shape) if want is not None else '?'} as one "
                           f"factor per head")
    if got.dtype != want.dtype:
        q = inserter.method("to", (q, want.dtype))
    site.q = q
