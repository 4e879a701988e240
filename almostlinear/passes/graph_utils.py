"""Small helpers shared by the FX passes: node reading, placeholder kinds, fake values, evaluation.

The passes work on the torch-level graph that TorchDynamo hands to a backend. Every helper here is
read-only on the graph unless its name says otherwise.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import networkx as nx
import torch
import torch.fx as fx


def is_call(node: Any, *targets: Any) -> bool:
    """True when `node` is a call_function/call_method node whose target is one of `targets`.

    Strings name methods (`"softmax"` matches `x.softmax(...)`), anything else is a function target.
    """
    return isinstance(node, fx.Node) and node.op in ("call_method", "call_function") and node.target in targets


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `name` of a call, given positionally at `index` or as a keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    if len(node.args) > index:
        return node.args[index]
    return default


def example_value(node: Any) -> Any:
    """The fake (or symbolic) value Dynamo recorded for `node`; plain Python values pass through."""
    if isinstance(node, fx.Node):
        meta = node.meta
        if "example_value" in meta:
            return meta["example_value"]
        return meta.get("val")
    return node


def tensor_meta(node: Any) -> torch.Tensor | None:
    value = example_value(node)
    return value if isinstance(value, torch.Tensor) else None


def shape_of(node: Any) -> tuple | None:
    value = tensor_meta(node)
    return None if value is None else tuple(value.shape)


def ndim_of(node: Any) -> int | None:
    value = tensor_meta(node)
    return None if value is None else value.dim()


def concrete_int(value: Any) -> int | None:
    """An int for a Python int or a backed SymInt (its example hint, without adding guards)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        hint = getattr(value.node, "hint", None)
        return int(hint) if hint is not None else None
    return None


def normalize_dim(dim: Any, ndim: int | None) -> int | None:
    if not isinstance(dim, int) or isinstance(dim, bool) or ndim is None:
        return None
    if dim < 0:
        dim += ndim
    return dim if 0 <= dim < ndim else None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_fake(value: Any) -> bool:
    """A FakeTensor: a value with a shape and dtype but no data (Dynamo's example values, fake example inputs)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Leave the CPU and (initialised) CUDA RNG states as they were on entry."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def fake_mode_of(gm: fx.GraphModule):
    """The FakeTensorMode that produced the graph's example values (None if there are none)."""
    for node in gm.graph.nodes:
        value = example_value(node)
        if isinstance(value, torch.Tensor) and hasattr(value, "fake_mode"):
            return value.fake_mode
    return None


# ---------------------------------------------------------------------------------------------------
# Placeholder kinds: what a graph input stands for (parameter, buffer, user input, size)
# ---------------------------------------------------------------------------------------------------

PARAMETER, BUFFER, INPUT, SIZE = "parameter", "buffer", "input", "size"


def placeholder_kind(node: fx.Node, example: Any) -> str:
    """Classify a placeholder by Dynamo's source for it (and the example value as a fallback)."""
    if isinstance(example, torch.nn.Parameter):
        return PARAMETER
    if isinstance(example, (int, torch.SymInt)) or isinstance(example_value(node), torch.SymInt):
        return SIZE
    grapharg = node.meta.get("grapharg")
    source_name = ""
    if grapharg is not None and getattr(grapharg, "source", None) is not None:
        try:
            source_name = grapharg.source.name()
        except Exception:  # noqa: BLE001 - a source without a name is just an input
            source_name = ""
    name = source_name or node.name
    if "_parameters" in name or "parameters_" in name:
        return PARAMETER
    if "_buffers" in name or "buffers_" in name:
        return BUFFER
    return INPUT


def placeholder_kinds(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[fx.Node, str]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = list(example_inputs) + [None] * (len(placeholders) - len(example_inputs))
    return {node: placeholder_kind(node, ex) for node, ex in zip(placeholders, examples)}


# ---------------------------------------------------------------------------------------------------
# Graph algorithms (networkx): dependence and reachability
# ---------------------------------------------------------------------------------------------------


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The data-flow graph: an edge u -> v when v reads u."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node)
        for user in node.users:
            graph.add_edge(node, user)
    return graph


def ancestors(graph: nx.DiGraph, node: fx.Node) -> set[fx.Node]:
    return nx.ancestors(graph, node)


def _is_size_value(node: fx.Node) -> bool:
    """A node that holds sizes (x.size(), x.shape[i], sym_size): shape information, not tensor data."""
    value = example_value(node)
    if isinstance(value, (torch.SymInt, torch.Size)) or (isinstance(value, int) and not isinstance(value, bool)):
        return True
    return isinstance(value, (tuple, list)) and len(value) > 0 and all(
        isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in value
    )


def input_dependencies(graph: nx.DiGraph, node: fx.Node, kinds: dict[fx.Node, str]) -> set[str]:
    """The placeholder kinds `node` depends on (e.g. {"buffer", "size"}).

    Reading a tensor's sizes is a dependence on its shape only: the walk records "size" there and does
    not continue into the tensor's data.
    """
    found: set[str] = set()
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            found.add(kinds.get(current, INPUT))
            continue
        if current is not node and _is_size_value(current):
            found.add(SIZE)
            continue
        stack.extend(graph.predecessors(current) if current in graph else current.all_input_nodes)
    return found


# ---------------------------------------------------------------------------------------------------
# Evaluating a shape-only / buffer-only subgraph on the real example inputs
# ---------------------------------------------------------------------------------------------------

_INPLACE_METHODS_SUFFIX = "_"


def _is_inplace(node: fx.Node) -> bool:
    if node.op == "call_method" and isinstance(node.target, str):
        return node.target.endswith(_INPLACE_METHODS_SUFFIX) and not node.target.startswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if getattr(node.target, "__module__", "") in ("_operator", "operator"):
            return name.startswith("i") and name[1:] in ("add", "sub", "mul", "truediv", "and", "or", "xor", "matmul")
        return bool(node.kwargs.get("inplace")) or (name.endswith("_") and not name.startswith("_"))
    return False


def evaluate(gm: fx.GraphModule, graph: nx.DiGraph, node: fx.Node, example_inputs: Sequence[Any]) -> Any:
    """Run only the nodes `node` depends on, on the real example inputs, and return its value.

    Used for masks that depend on shapes and buffers only. When the subgraph has in-place operations,
    it runs on copies of the inputs, so nothing the user owns is mutated.
    """
    needed = ancestors(graph, node) | {node}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    copy_inputs = any(_is_inplace(n) for n in needed)  # e.g. F._canonical_mask's zeros_like().masked_fill_()
    env: dict[fx.Node, Any] = {}
    for ph, ex in zip(placeholders, example_inputs):
        if ph not in needed:
            continue
        if isinstance(ex, torch.SymInt):
            ex = concrete_int(ex)
        elif copy_inputs and isinstance(ex, torch.Tensor):
            ex = ex.detach().clone()  # in-place ops may then only touch copies, never the user's tensors
        env[ph] = ex
    for current in gm.graph.nodes:
        if current not in needed or current.op == "placeholder":
            continue
        args = fx.node.map_arg(current.args, lambda n: env[n])
        kwargs = fx.node.map_arg(current.kwargs, lambda n: env[n])
        if current.op == "call_function":
            env[current] = current.target(*args, **kwargs)
        elif current.op == "call_method":
            self_obj, *rest = args
            env[current] = getattr(self_obj, current.target)(*rest, **kwargs)
        elif current.op == "get_attr":
            value = gm
            for atom in str(current.target).split("."):
                value = getattr(value, atom)
            env[current] = value.detach().clone() if copy_inputs and isinstance(value, torch.Tensor) else value
        elif current.op == "call_module":
            env[current] = gm.get_submodule(current.target)(*args, **kwargs)
        else:
            raise ValueError(f"cannot evaluate node of kind {current.op}")
    return env[node]


def fake_value(fake_mode, target, args, kwargs, method: bool = False) -> Any:
    """The value a new call would have, computed on the example values under the graph's fake mode."""
    from contextlib import nullcontext

    fargs = fx.node.map_arg(args, example_value)
    fkwargs = fx.node.map_arg(kwargs, example_value)
    with fake_mode if fake_mode is not None else nullcontext():
        if method:
            self_obj, *rest = fargs
            return getattr(self_obj, target)(*rest, **fkwargs)
        return target(*fargs, **fkwargs)


_META_KEYS = ("stack_trace", "nn_module_stack", "source_fn_stack", "seq_nr", "original_aten")


def annotate(node: fx.Node, value: Any, source: fx.Node | None) -> fx.Node:
    """Give a new node its fake value (`example_value` and `val`) and the source metadata of `source`."""
    node.meta["example_value"] = value
    node.meta["val"] = value
    for key in _META_KEYS:
        if source is not None and key in source.meta:
            node.meta[key] = source.meta[key]
    return node


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


# ---------------------------------------------------------------------------------------------------
# Dead pure code: introspection copies nothing reads (a clone of the scores, a detached copy of the weights)
# ---------------------------------------------------------------------------------------------------

# Only these are removed when unused: functional tensor ops that read their inputs and return a new value.
# Everything else stays (in-place ops, dropout and other random ops, collectives, grad-mode switches,
# asserts, calls returning None, higher-order ops, modules): torch.fx's default `Node.is_impure` treats
# every call_method (`c.mul_(2)`, `x.copy_(y)`) and most torch-level functions (`F.dropout`) as pure.
PURE_METHODS = frozenset({
    "clone", "detach", "to", "float", "half", "double", "bfloat16", "type", "type_as", "cpu", "cuda", "bool",
    "long", "int", "contiguous", "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose",
    "permute", "t", "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "size", "dim", "numel", "softmax",
    "log_softmax", "exp", "log", "tanh", "sigmoid", "abs", "neg", "sqrt", "rsqrt", "pow", "mul", "div", "add",
    "sub", "matmul", "bmm", "sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "std", "var",
    "norm", "masked_fill", "where", "eq", "ne", "gt", "ge", "lt", "le", "isnan", "isinf", "isfinite", "any",
    "all", "clamp", "clip", "narrow", "select", "gather", "index_select", "split", "chunk", "unbind",
    "new_zeros", "new_ones", "new_full", "new_tensor", "tril", "triu", "square", "logsumexp", "cumsum",
    "clamp_min", "clamp_max", "log2", "topk", "sort",
})
_PURE_TORCH_NAMES = frozenset({
    "matmul", "bmm", "baddbmm", "einsum", "softmax", "log_softmax", "transpose", "reshape", "flatten", "unflatten",
    "squeeze", "unsqueeze", "permute", "where", "masked_fill", "mul", "div", "true_divide", "add", "sub", "exp",
    "log", "tanh", "sigmoid", "abs", "neg", "sqrt", "rsqrt", "pow", "sum", "mean", "amax", "amin", "max", "min",
    "argmax", "argmin", "std", "var", "norm", "clamp", "clip", "clone", "detach", "cat", "stack", "zeros_like",
    "ones_like", "full_like", "empty_like", "isnan", "isinf", "isfinite", "any", "all", "eq", "ne", "gt", "ge",
    "lt", "le", "logical_not", "logical_and", "logical_or", "tril", "triu", "square", "logsumexp", "cumsum",
    "narrow", "select", "gather", "index_select", "split", "chunk", "unbind", "broadcast_to", "swapaxes",
    "swapdims", "t", "relu", "gelu", "silu", "layer_norm", "linear",
})
_PURE_OPERATORS = frozenset({
    "add", "sub", "mul", "truediv", "floordiv", "mod", "neg", "pos", "pow", "matmul", "getitem", "eq", "ne",
    "lt", "le", "gt", "ge", "and_", "or_", "xor", "invert", "not_",
})


def is_pure(node: fx.Node) -> bool:
    """True for a node that may be erased when nothing reads it: an allow-listed functional op (see
    PURE_METHODS) without `out=`/`inplace=True`, or a `getattr` read. Placeholders, outputs, modules and any
    op not on the lists are impure."""
    if node.op == "get_attr":
        return True
    if node.op not in ("call_method", "call_function") or "out" in node.kwargs or node.kwargs.get("inplace"):
        return False
    if node.op == "call_method":
        return node.target in PURE_METHODS
    target = node.target
    if node.is_impure():  # fx's own list (grad-mode switches, asserts, mutable schemas, seeded random ops)
        return False
    if target is getattr:
        return True
    module, name = getattr(target, "__module__", None) or "", getattr(target, "__name__", "")
    if module in ("_operator", "operator"):
        return name in _PURE_OPERATORS
    if target in (torch.nn.functional.softmax, torch.nn.functional.log_softmax, torch.nn.functional.linear,
                  torch.nn.functional.layer_norm, torch.nn.functional.gelu, torch.nn.functional.silu,
                  torch._C._nn.linear):  # (not F.relu: its `inplace` may be positional; not SDPA: dropout_p)
        return True
    return name in _PURE_TORCH_NAMES and getattr(torch, name, None) is target


_RANDOM_NAMES = ("dropout", "rand", "bernoulli", "normal", "multinomial", "poisson", "rrelu", "gumbel", "uniform",
                 "exponential", "geometric", "cauchy", "log_normal", "seed")


def may_erase_unused(node: fx.Node) -> bool:
    """Looser than `is_pure`, for the inputs of a replaced attention chain: any call that fx does not deem
    impure, except in-place ops and random ones (their RNG draws change later draws)."""
    if node.op not in ("call_function", "call_method") or node.is_impure() or _is_inplace(node):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return not any(word in str(name).lower() for word in _RANDOM_NAMES)


def eliminate_dead_pure_code(gm: fx.GraphModule) -> int:
    """Erase pure nodes (`is_pure`) that nothing reads, repeatedly (a dead `s.clone().float()` goes whole).
    Returns how many nodes were erased. Graph outputs (returned values, attributes Dynamo stores back on a
    module) are read by the output node and are never dead."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and is_pure(node):
            gm.graph.erase_node(node)
            removed += 1
    return removed
