"""Small helpers shared by the FX passes: node reading, placeholder kinds, fake values, evaluation.

The passes work on the torch-level graph that TorchDynamo hands to a backend. Every helper here is
read-only on the graph unless its name says otherwise.
"""
from __future__ import annotations

from typing import Any, Sequence

import networkx as nx
import torch
import torch.fx as fx


def is_call(node: Any, *targets: Any) -> bool:
    """True when `node` is a call_function/call_method node whose target is one of `targets`.

    Strings name methods (`"softmax"` matches `x.softmax(...)`), anything else is a function target.
    """
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target in targets
    if node.op == "call_function":
        return node.target in targets
    return False


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


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None

