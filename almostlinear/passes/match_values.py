"""Walking down from the softmax (`match_values`): through casts, layout steps and one dropout to the
matmul (or einsum) with the values."""
from __future__ import annotations

import torch.fx as fx

from .graph_utils import is_call, single_user
from .match_einsum import einsum_values
from .match_rules import is_cast, is_layout_step, op_name, other_uses
from .normalize import DROPOUT, MATMUL
from .site import AttentionSite, NotAttention


def _only_user(node: fx.Node) -> fx.Node:
    """The one reader of the attention weights (or of a cast/view/dropout of them)."""
    user = single_user(node)
    if user is not None:
        return user
    if not node.users:
        raise NotAttention("attention weights are not used")
    matmuls = [u for u in node.users if is_call(u, MATMUL) and u.args[0] is node]
    others = other_uses(node, matmuls[0] if len(matmuls) == 1 else None)
    raise NotAttention(f"attention weights are used outside the site: also read by {others}")


def _record_dropout(user: fx.Node, site: AttentionSite) -> None:
    if site.dropout_p not in (0.0, None):
        raise NotAttention("two dropouts on the attention weights")
    site.dropout_p, site.dropout_training = user.args[1], user.args[2]


def match_values(softmax: fx.Node, site: AttentionSite) -> None:
    """Set the site's v and output; the casts, layout steps and dropout on the way join its chain."""
    node = softmax
    while True:
        user = _only_user(node)
        if is_cast(user) or (is_layout_step(user) and user.args[0] is node):
            site.chain.append(user)
        elif is_call(user, DROPOUT) and user.args[0] is node:
            _record_dropout(user, site)
            site.chain.append(user)
        elif is_call(user, MATMUL) and user.args[0] is node:
            site.v, site.output = user.args[1], user
            return
        elif (found := einsum_values(user, node)) is not None:
            site.v, site.output = found[0].node, user
            site.einsum_perms.update(v=found[0].perm, out=found[1])
            return
        else:
            raise NotAttention(f"attention weights feed `{op_name(user)}`, not a matmul with values")
        node = user
