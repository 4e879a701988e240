"""Attention inside higher-order ops: checkpointed regions are matched and rewritten in their own body.

Dynamo captures `torch.utils.checkpoint.checkpoint(fn, *args)` (use_reentrant False and True alike) as

    wrap_body_0 = self.wrap_body_0
    out = torch.ops.higher_order.tag_activation_checkpoint(wrap_body_0, *args, use_reentrant=...)

with the body a GraphModule attribute of the parent (nested checkpoints: attributes of the body). The
softmax is then not a node of the parent graph. This pass finds such regions, gives each body a private
copy (the captured graph module and its bodies stay untouched) and normalizes and matches inside it, so the
backend can rewrite the body in place: the higher-order op stays, so the region is still recomputed in the
backward (inlining the body would lose the memory saving).

Masks are classified from real values: the real inputs of a region are computed by running the parent
graph on its real example inputs up to the region's call (only the nodes the call's arguments need, once
for all regions of a graph, and only when a body holds a softmax or an SDPA call). When they cannot be
computed (fake example inputs, an error), the body's placeholders keep their fake values and static
masks are "not understood" (dense): still rewritten exactly, never approximated.

Bodies of other higher-order ops (cond, map, invoke_subgraph, custom autograd.Function, ...) are not
rewritten; attention found in them is reported as a near miss with the reason.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch._ops import HigherOrderOperator

from . import match as matcher
from .graph_utils import (BUFFER, INPUT, PARAMETER, SIZE, concrete_int, example_value, input_dependencies, is_call,
                          is_fake, placeholder_kind, placeholder_kinds, rng_preserved, to_networkx)
from .mha import MHA, decompose_mha
from .normalize import SOFTMAX, normalize

CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint


@dataclass
class Region:
    """One higher-order op call whose body holds attention (or holds a region that does)."""

    call: fx.Node  # the higher-order op node in the parent graph
    parent: fx.GraphModule
    name: str  # the body's attribute name in the parent, e.g. "wrap_body_0"
    body: fx.GraphModule  # the private copy the parent now calls (a checkpoint body), or the original
    hop: str  # the higher-order op's name, e.g. "tag_activation_checkpoint"
    label: str  # for the report, e.g. "checkpoint wrap_body_0, use_reentrant=False"
    rewritable: bool  # checkpoint bodies are rewritten; other bodies are only reported
    sites: list = field(default_factory=list)
    misses: list = field(default_factory=list)
    mha_calls: list = field(default_factory=list)
    values_note: str = ""  # why the body's inputs have no real values (masks then stay unproved)
    outer: "Region | None" = None

    @property
    def note(self) -> str:
        """The prefix of every report row of this region (nested regions name their outer ones)."""
        if self.rewritable:
            return f"inside a checkpointed region ({self.label_path})"
        return f"inside a `{self.hop}` region ({self.label_path})"

    @property
    def label_path(self) -> str:
        return self.label if self.outer is None else f"{self.outer.label_path} > {self.label}"


def _hop_bodies(gm: fx.GraphModule, node: fx.Node) -> list[tuple[fx.Node, str, fx.GraphModule]]:
    """(get_attr node, attribute name, graph module) of each body passed to a higher-order op call."""
    if node.op != "call_function" or not isinstance(node.target, HigherOrderOperator):
        return []
    bodies = []
    for a in _nodes((node.args, node.kwargs)):
        if a.op != "get_attr":
            continue
        try:
            module = gm.get_submodule(str(a.target))
        except AttributeError:
            continue
        if isinstance(module, fx.GraphModule):
            bodies.append((a, str(a.target), module))
    return bodies


def copy_with_node_map(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A copy of `gm` (new graph and nodes, meta copied; the same attributes and submodules) and the map from
    each node of `gm` to its copy."""
    memo: dict[Any, Any] = {id(gm): gm}  # non-empty: fx.Graph.__deepcopy__ then fills this dict as its node map
    graph = copy.deepcopy(gm.graph, memo)
    work = fx.GraphModule(gm, graph)
    work.meta = dict(getattr(gm, "meta", {}))
    return work, {old: new for old, new in memo.items() if isinstance(old, fx.Node)}


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """New graph and nodes (meta copied), the same attributes (submodules stay shared)."""
    return copy_with_node_map(gm)[0]


def copy_with_bodies(gm: fx.GraphModule) -> fx.GraphModule:
    """`copy_graph_module`, and every higher-order op body (recursively) copied too."""
    work = copy_graph_module(gm)
    for node in work.graph.nodes:
        for _, name, body in _hop_bodies(work, node):
            _set_submodule(work, name, copy_with_bodies(body))
    return work


def _set_submodule(gm: fx.GraphModule, name: str, module: torch.nn.Module) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    setattr(owner, attr, module)


def _has_attention(gm: fx.GraphModule) -> bool:
    """Any softmax, SDPA or nn.MultiheadAttention call in a body, or in a body nested in it."""
    for node in gm.graph.nodes:
        if is_call(node, SOFTMAX, torch.nn.functional.softmax, "softmax", matcher.SDPA, MHA):
            return True
        if any(_has_attention(body) for _, _, body in _hop_bodies(gm, node)):
            return True
    return False


def _label(node: fx.Node, name: str) -> str:
    if node.target is CHECKPOINT:
        reentrant = node.kwargs.get("use_reentrant")
        flavour = "" if reentrant is None else f", use_reentrant={reentrant}"
        return f"checkpoint {name}{flavour}"
    return f"{node.target.name()} {name}"


def find_regions(gm: fx.GraphModule, example_inputs: Sequence[Any] | None, outer: Region | None = None,
                 rewritable: bool = True) -> list[Region]:
    """The regions of `gm` whose bodies hold attention, with their sites and near misses; nested regions
    follow their outer one. `gm` belongs to the caller: each checkpoint body with attention is replaced
    there by a normalized private copy (the body the caller then rewrites); the original stays untouched.

    `example_inputs`: the real values of `gm`'s placeholders, or None when they are unknown.
    """
    found: list[tuple[fx.Node, str, fx.GraphModule, bool, list]] = []
    for node in list(gm.graph.nodes):
        bodies = _hop_bodies(gm, node)
        for _, name, body in bodies:
            if not _has_attention(body):
                continue
            ok = rewritable and node.target is CHECKPOINT and len(bodies) == 1
            if ok and sum(1 for u in gm.graph.nodes if u.op == "get_attr" and u.target == name) > 1:
                ok = False  # one body called from several places: its masks may differ per call
            body = copy_graph_module(body)  # normalizing must not touch the captured body
            if ok:
                _set_submodule(gm, name, body)
            mha_calls = decompose_mha(body)
            normalize(body)
            found.append((node, name, body, ok, mha_calls))
    if not found:
        return []
    values: dict[fx.Node, list] = {}
    unknown = "the example inputs are fake"
    if example_inputs is not None:
        try:
            values = call_inputs(gm, [node for node, _, _, ok, _ in found if ok], example_inputs)
        except Exception as exc:  # noqa: BLE001 - masks then stay unproved; the rewrite stays exact
            unknown = f"the region's inputs could not be computed ({type(exc).__name__}: {exc})"[:200]
    kinds = placeholder_kinds(gm, example_inputs if example_inputs is not None else [])
    graph = to_networkx(gm)
    regions: list[Region] = []
    for node, name, body, ok, mha_calls in found:
        if ok:
            align_placeholder_kinds(body, node, graph, kinds)
        region = Region(node, gm, name, body, node.target.name(), _label(node, name), ok, outer=outer)
        region.mha_calls = mha_calls
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        inputs = values.get(node) if ok else None
        if inputs is not None and len(inputs) != len(placeholders):
            region.values_note = f"the call passes {len(inputs)} inputs to a body of {len(placeholders)}"
            inputs = None
        elif inputs is None:
            region.values_note = unknown if ok else "the body is not rewritten"
        if inputs is None:
            inputs = [example_value(p) for p in placeholders]  # fake: static masks cannot be evaluated
        try:
            region.sites, region.misses = matcher.find_sites(body, inputs)
        except Exception as exc:  # noqa: BLE001 - one body the matcher cannot read must not stop compiling
            region.sites = []
            region.misses = [matcher.NearMiss(node, f"the body could not be matched ({type(exc).__name__}: "
                                                    f"{exc})"[:200])]
        regions.append(region)
        regions.extend(find_regions(body, None if region.values_note else inputs, region, ok))
    return regions


def align_placeholder_kinds(body: fx.GraphModule, call: fx.Node, parent_graph, parent_kinds: dict) -> None:
    """Make each body placeholder read as what its argument is in the parent graph.

    The matcher classifies placeholders without a Dynamo source by their name ("..._buffers_..." is a
    buffer, "..._parameters_..." a parameter, anything else user data). A body's placeholders are named
    after the parent's nodes, i.e. after the user's variables, so that would be guessing: a mask built
    from buffers and sizes outside the checkpoint (static: its values may be evaluated and its structure
    proved) would be taken for data, and a data tensor held in a variable called `buffers_...` for a
    buffer. Here each argument's kind is derived from the parent (a parent placeholder's own kind; for a
    computed argument: data if it depends on user inputs or parameters, else buffer), and a placeholder
    whose name says otherwise is replaced by one whose name says it (positional: the call is unchanged).
    """
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    for ph, a in zip(placeholders, call.args[1:]):
        if not isinstance(a, fx.Node) or placeholder_kind(ph, None) == SIZE:
            continue
        if a.op == "placeholder":
            want = parent_kinds.get(a, INPUT)
        else:
            deps = input_dependencies(parent_graph, a, parent_kinds)
            want = INPUT if deps & {INPUT, PARAMETER} else BUFFER
        if want == SIZE or placeholder_kind(ph, None) == want:
            continue
        stem = ph.name.replace("parameters_", "").replace("_parameters", "")
        stem = stem.replace("buffers_", "").replace("_buffers", "") or "arg"
        wanted_name = {INPUT: stem, BUFFER: f"{stem}_buffers_", PARAMETER: f"{stem}_parameters_"}[want]
        with body.graph.inserting_before(ph):
            new = body.graph.placeholder(wanted_name, type_expr=ph.type)
        new.meta = dict(ph.meta)
        ph.replace_all_uses_with(new)
        body.graph.erase_node(ph)
    body.recompile()


def call_inputs(gm: fx.GraphModule, calls: list[fx.Node], example_inputs: Sequence[Any]) -> dict[fx.Node, list]:
    """The real values of the arguments of each call after its body, computed by running only the nodes
    they depend on, once for all calls, without autograd and leaving the RNG state as it was. Inputs and
    buffers are copied first (in-place ops such as batch norm's running statistics then touch the copies);
    parameters are not (a forward does not write them, and a copy would double the model's memory).
    """
    if not calls:
        return {}
    args_of = {call: list(call.args[1:]) for call in calls}
    needed = _needed_by(args_of)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    free_after = _free_after(needed, args_of, order)
    given = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    env = interpreter.env
    results: dict[fx.Node, list] = {}
    with rng_preserved(), torch.no_grad():
        for node in gm.graph.nodes:
            if node in args_of:
                results[node] = [env[a] if isinstance(a, fx.Node) else a for a in args_of[node]]
                if len(results) == len(calls):
                    break
            if node not in needed:
                continue
            env[node] = _input_value(node, given[node]) if node.op == "placeholder" else interpreter.run_node(node)
            for done in free_after.get(order[node], ()):
                env.pop(done, None)
    return results


def _needed_by(args_of: dict[fx.Node, list]) -> set[fx.Node]:
    """The nodes the calls' arguments depend on (the arguments included)."""
    needed: set[fx.Node] = set()
    stack = [a for args in args_of.values() for a in _nodes(args)]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    return needed


def _free_after(needed: set[fx.Node], args_of: dict[fx.Node, list], order: dict) -> dict[int, list[fx.Node]]:
    """For each position in the graph, the values nothing needed reads after it (freed to save memory)."""
    last_use: dict[fx.Node, int] = {}
    for node in needed:
        for inp in node.all_input_nodes:
            last_use[inp] = max(last_use.get(inp, -1), order[node])
    for call, args in args_of.items():
        for a in _nodes(args):
            last_use[a] = max(last_use.get(a, -1), order[call])
    free_after: dict[int, list[fx.Node]] = {}
    for node, last in last_use.items():
        free_after.setdefault(last, []).append(node)
    return free_after


def _input_value(placeholder: fx.Node, value: Any) -> Any:
    """A placeholder's real value to run on: SymInts by their hint, inputs and buffers copied."""
    if is_fake(value):
        raise ValueError("the example inputs are fake")
    if isinstance(value, torch.SymInt):
        return concrete_int(value)
    if isinstance(value, torch.Tensor) and not (
            isinstance(value, torch.nn.Parameter) or placeholder_kind(placeholder, value) == PARAMETER):
        return value.detach().clone()  # in-place ops (batch norm statistics) touch copies
    return value


def _nodes(args: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def code_with_bodies(gm: fx.GraphModule, prefix: str = "") -> str:
    """The graph's code, followed by the code of every higher-order op body it calls (recursively)."""
    parts = [gm.code]
    for node in gm.graph.nodes:
        for _, name, body in _hop_bodies(gm, node):
            qualified = f"{prefix}{name}"
            parts.append(f"\n# {qualified}: body of torch.ops.higher_order.{node.target.name()}\n")
            parts.append(code_with_bodies(body, qualified + "."))
    return "".join(parts)


__all__ = ["Region", "find_regions", "call_inputs", "copy_graph_module", "copy_with_node_map", "copy_with_bodies",
           "code_with_bodies", "CHECKPOINT"]
