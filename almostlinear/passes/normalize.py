"""Canonical spellings: rewrite equivalent call forms to one target each, without changing numerics.

Dynamo graphs mix `call_method` and `call_function`, `operator.matmul` and `torch.matmul`, `.mT` and
`.transpose(-2, -1)`. Each rule below is a (pattern, rewrite) pair for one family of spellings; every
rewrite computes exactly the same values as the node it replaces (a `div` is never turned into a `mul`,
`bmm` on 3-D tensors is the same kernel as `matmul`). After this pass the matcher sees:

    torch.matmul(a, b)                      # @, torch.matmul, Tensor.matmul, torch.bmm, Tensor.bmm
    torch.softmax(x, dim, dtype=None)       # F.softmax, torch.softmax, Tensor.softmax
    torch.transpose(x, d0, d1)              # .transpose, .mT, .t(), .swapaxes, a permute that swaps two dims
    torch.nn.functional.dropout(x, p, training)   # F.dropout, torch.dropout, Tensor.dropout-free forms
    operator.mul / operator.truediv / operator.add # torch.mul, Tensor.mul, torch.div (no rounding), ...
    torch.masked_fill(x, mask, value)       # Tensor.masked_fill
    torch.where(cond, a, b)                 # Tensor.where
    x.to(dtype)                             # .float(), .half(), .bfloat16(), .double(), .type(dtype), .type_as(y)
    out-of-place ops                        # x /= c, x.masked_fill_(m, v) on a fresh x read only after it
    torch.tanh(x)                           # Tensor.tanh, F.tanh (soft-capped scores)

Dead pure code is erased last (`graph_utils.eliminate_dead_pure_code`): a `clone()`, `.detach()` or
`.float()` copy of the scores or weights kept for introspection that nothing reads would otherwise look like
a second use of the attention's intermediates. Only allow-listed functional ops are erased; in-place ops,
random ops (dropout) and anything with side effects stay, and values Dynamo returns or stores back on a
module are graph outputs, never dead.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import arg, eliminate_dead_pure_code, ndim_of, normalize_dim, tensor_meta

MATMUL = torch.matmul
SOFTMAX = torch.softmax
TRANSPOSE = torch.transpose
DROPOUT = F.dropout
MASKED_FILL = torch.masked_fill
WHERE = torch.where
TANH = torch.tanh

@dataclass(frozen=True)
class Rule:
    """Applies to nodes for which `matches` is true; `rewrite` returns the replacement call or None: a
    function call (target, args, kwargs) or a method call ("method", name, args, kwargs)."""

    name: str
    matches: Callable[[fx.Node], bool]
    rewrite: Callable[[fx.Node], tuple | None]


def _fn(*targets):
    return lambda n: n.op == "call_function" and n.target in targets


def _method(*names):
    return lambda n: n.op == "call_method" and n.target in names


def _either(functions: tuple, methods: tuple):
    f, m = _fn(*functions), _method(*methods)
    return lambda n: f(n) or m(n)


# -- matmul: `q @ k`, torch.matmul, Tensor.matmul, torch.bmm / Tensor.bmm (GPT-2 style 3-D code) ----------
def _rewrite_matmul(node: fx.Node):
    if node.kwargs or len(node.args) != 2:
        return None
    return (MATMUL, tuple(node.args), {})


# -- softmax: F.softmax(x, dim, _stacklevel, dtype), torch.softmax(x, dim, dtype), x.softmax(dim, dtype) --
def _rewrite_softmax(node: fx.Node):
    x = node.args[0] if node.args else node.kwargs.get("input")
    if node.op == "call_function" and node.target is F.softmax:
        dim, dtype = arg(node, 1, "dim"), arg(node, 3, "dtype")
    else:
        dim, dtype = arg(node, 1, "dim"), arg(node, 2, "dtype")
    if dim is None or x is None:
        return None  # implicit-dim softmax is deprecated and ambiguous; leave it alone
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return (SOFTMAX, (x, dim), kwargs)


# -- transpose spellings: .transpose(a, b), .mT, .t(), .swapaxes/.swapdims, permute that swaps two dims ---
def _rewrite_transpose(node: fx.Node):
    if node.op == "call_function" and node.target is getattr:
        x, attr = node.args
        return (TRANSPOSE, (x, -2, -1), {}) if attr == "mT" else None
    x = node.args[0]
    if node.target in ("t", torch.t):
        return (TRANSPOSE, (x, 0, 1), {}) if ndim_of(x) == 2 else None
    if node.target in ("permute", torch.permute):
        dims = node.args[1:] if node.op == "call_method" else node.args[1]
        if node.op == "call_method" and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        ndim = ndim_of(x)
        dims = [normalize_dim(d, ndim) for d in dims]
        if ndim is None or None in dims or sorted(dims) != list(range(ndim)):
            return None
        moved = [i for i, d in enumerate(dims) if d != i]
        if len(moved) != 2 or dims[moved[0]] != moved[1]:
            return None  # not a swap of exactly two dims: a genuine permute, kept as it is
        return (TRANSPOSE, (x, moved[0], moved[1]), {})
    d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
    if d0 is None or d1 is None:
        return None
    return (TRANSPOSE, (x, d0, d1), {})


def _is_transpose_spelling(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] == "mT"
    return (node.op == "call_method" and node.target in ("transpose", "t", "permute", "swapaxes", "swapdims")) or (
        node.op == "call_function" and node.target in (torch.t, torch.permute, torch.swapaxes, torch.swapdims)
    )


# -- dropout: torch.dropout(x, p, train) -> F.dropout(x, p, training) -----------------------------------
def _rewrite_dropout(node: fx.Node):
    x = node.args[0]
    if node.target is torch.dropout:
        p, train = arg(node, 1, "p"), arg(node, 2, "train")
        return (DROPOUT, (x, p, train), {})
    p, training, inplace = arg(node, 1, "p", 0.5), arg(node, 2, "training", True), arg(node, 3, "inplace", False)
    if inplace:
        return None
    return (DROPOUT, (x, p, training), {})


# -- elementwise arithmetic: torch.mul / Tensor.mul / torch.div (no rounding mode) / torch.add (no alpha) -
def _binary(target):
    def rewrite(node: fx.Node):
        if len(node.args) != 2 or node.kwargs:
            return None  # alpha=, rounding_mode=, out= change the meaning: leave those alone
        return (target, tuple(node.args), {})

    return rewrite


def _rewrite_masked_fill(node: fx.Node):
    x, mask, value = node.args[0], arg(node, 1, "mask"), arg(node, 2, "value")
    return (MASKED_FILL, (x, mask, value), {})


def _rewrite_where(node: fx.Node):
    """x.where(cond, other) == torch.where(cond, x, other)."""
    x, cond, other = node.args[0], arg(node, 1, "condition"), arg(node, 2, "other")
    return None if cond is None or other is None else (WHERE, (cond, x, other), {})


_CASTS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}


def _rewrite_cast(node: fx.Node):
    x = node.args[0]
    if node.target in _CASTS and len(node.args) == 1 and not node.kwargs:
        return ("method", "to", (x, _CASTS[node.target]), {})
    if node.target == "type" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype):
        return ("method", "to", (x, node.args[1]), {})
    return None


_INPLACE = {operator.itruediv: operator.truediv, operator.imul: operator.mul, operator.iadd: operator.add,
            operator.isub: operator.sub, "div_": operator.truediv, "mul_": operator.mul, "add_": operator.add,
            "sub_": operator.sub, "masked_fill_": torch.masked_fill}
_INPLACE_ARITY = {"masked_fill_": 3}
_ARITHMETIC = tuple(op for op in _INPLACE if op != "masked_fill_")


def _is_private_inplace(node: fx.Node) -> bool:
    """`x /= c` (Falcon: `attention_scores /= math.sqrt(head_dim)`) or `sim.masked_fill_(~mask, -max)`
    (lucidrains-style code) on a fresh value computed in the graph (not a view of another tensor), whose other
    readers all come after it: they read the mutated value, so the op is the out-of-place one and they read its
    result (`_redirect_later_readers`); nobody can observe the difference."""
    if node.op not in ("call_function", "call_method") or node.target not in _INPLACE:
        return False
    if len(node.args) != _INPLACE_ARITY.get(node.target, 2) or node.kwargs:
        return False
    x = node.args[0]
    if not (isinstance(x, fx.Node) and _fresh(x)):
        return False
    other = tensor_meta(node.args[1]) if node.target in _ARITHMETIC else None
    if other is not None and other.dtype != getattr(tensor_meta(x), "dtype", None):
        return False  # x *= y keeps x's dtype, x * y promotes
    return all(user is node or user > node for user in x.users)  # fx nodes compare by their place in the graph


def _redirect_later_readers(old: fx.Node, new: fx.Node) -> None:
    """After an in-place op became `new`, the readers of its mutated operand that come after it read `new`."""
    new.args[0].replace_all_uses_with(new, delete_user_cb=lambda user: user > new and user is not old)


# Ops whose result is a new tensor, never a view of an input (an in-place op on a view would write through to
# the tensor it views: `w[..., 0].mul_(2)` changes w).
_FRESH_FUNCTIONS = (operator.matmul, torch.matmul, torch.bmm, torch.baddbmm, torch.einsum, operator.add,
                    operator.sub, operator.mul, operator.truediv, torch.add, torch.mul, torch.div, torch.softmax,
                    F.softmax, torch.exp, torch.tanh, torch.where, torch.masked_fill, torch.clone)
_FRESH_METHODS = ("matmul", "bmm", "baddbmm", "softmax", "clone", "exp", "tanh", "masked_fill", "add", "mul", "div")


def _fresh(x: fx.Node) -> bool:
    return (x.op == "call_function" and x.target in _FRESH_FUNCTIONS) or (
        x.op == "call_method" and x.target in _FRESH_METHODS)


def _rewrite_inplace(node: fx.Node):
    return (_INPLACE[node.target], tuple(node.args), {})


def _rewrite_type_as(node: fx.Node):
    """`p.type_as(s)` (a float32 softmax cast back: lucidrains-style code) is `p.to(s.dtype)` when both are on
    one device (the dtype of a graph value is fixed; `type_as` would also move p to s's device)."""
    if len(node.args) != 2 or node.kwargs:
        return None
    x, other = (tensor_meta(a) for a in node.args)
    if x is None or other is None or x.device != other.device:
        return None
    return ("method", "to", (node.args[0], other.dtype), {})


def _rewrite_tanh(node: fx.Node):
    if len(node.args) != 1 or node.kwargs:
        return None
    return (TANH, (node.args[0],), {})


RULES: tuple[Rule, ...] = (
    Rule("matmul", _either((operator.matmul, torch.bmm), ("matmul", "bmm")), _rewrite_matmul),
    Rule("softmax", _either((F.softmax, torch.softmax), ("softmax",)), _rewrite_softmax),
    Rule("transpose", _is_transpose_spelling, _rewrite_transpose),
    Rule("dropout", _fn(torch.dropout, F.dropout), _rewrite_dropout),
    Rule("mul", _either((torch.mul,), ("mul",)), _binary(operator.mul)),
    Rule("div", _either((torch.div, torch.true_divide), ("div", "true_divide")), _binary(operator.truediv)),
    Rule("add", _either((torch.add,), ("add",)), _binary(operator.add)),
    Rule("masked_fill", _method("masked_fill"), _rewrite_masked_fill),
    Rule("where", _method("where"), _rewrite_where),
    Rule("cast", _method(*_CASTS, "type"), _rewrite_cast),
    Rule("type_as", _method("type_as"), _rewrite_type_as),
    Rule("tanh", _either((torch.tanh, F.tanh), ("tanh",)), _rewrite_tanh),
    Rule("inplace", _is_private_inplace, _rewrite_inplace),
)


def _already_canonical(node: fx.Node, replacement: tuple) -> bool:
    if replacement[0] == "method":
        return node.op == "call_method" and node.target == replacement[1] and tuple(node.args) == replacement[2]
    target, args, kwargs = replacement
    return (node.op == "call_function" and node.target is target and tuple(node.args) == args
            and dict(node.kwargs) == kwargs)


def normalize(gm: fx.GraphModule) -> int:
    """Rewrite every node that has a canonical spelling, then erase dead pure code; returns how many nodes
    changed or were erased."""
    changed = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        for rule in RULES:
            if not rule.matches(node):
                continue
            replacement = rule.rewrite(node)
            if replacement is None or _already_canonical(node, replacement):
                break
            with graph.inserting_before(node):
                if replacement[0] == "method":
                    _, name, args, kwargs = replacement
                    new = graph.call_method(name, args, kwargs)
                else:
                    target, args, kwargs = replacement
                    new = graph.call_function(target, args, kwargs)
            new.meta = dict(node.meta)
            if rule.name == "inplace":
                _redirect_later_readers(node, new)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            changed += 1
            break
    changed += eliminate_dead_pure_code(gm)
    if changed:
        graph.lint()
        gm.recompile()
    return changed
