"""NodeBuilder: insert new nodes into a graph, each with its fake value and its source metadata.

Every node a pass adds gets `example_value`/`val` (computed on the example values under the graph's fake
mode) and the `stack_trace`/`nn_module_stack` of the node it stands for, so Inductor does not warn
(pytorch #114873) and reports point at the user's source. Used by the MHA decomposition and both rewrites.

    build = NodeBuilder(gm, before=site.output, source=site.anchor, fake_mode=fake_mode)
    scores = build.call(torch.matmul, q, build.method("transpose", k, -2, -1))
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .graph_utils import annotate, fake_value


class NodeBuilder:
    """Inserts nodes before `before`, annotated from `source` (default: `before`)."""

    def __init__(self, gm: fx.GraphModule, before: fx.Node, fake_mode, source: fx.Node | None = None):
        self.gm, self.before, self.fake_mode = gm, before, fake_mode
        self.source = source if source is not None else before
        self.created: list[fx.Node] = []

    def _make(self, op: str, target: Any, args: tuple, kwargs: dict) -> fx.Node:
        value = fake_value(self.fake_mode, target, args, kwargs, method=(op == "call_method"))
        with self.gm.graph.inserting_before(self.before):
            node = self.gm.graph.create_node(op, target, args, kwargs)
        self.created.append(node)
        return annotate(node, value, self.source)

    def call(self, target: Any, /, *args: Any, **kwargs: Any) -> fx.Node:
        """A call_function node `target(*args, **kwargs)`."""
        return self._make("call_function", target, args, kwargs)

    def method(self, name: str, /, *args: Any, **kwargs: Any) -> fx.Node:
        """A call_method node `args[0].name(*args[1:], **kwargs)`."""
        return self._make("call_method", name, args, kwargs)

    def getitem(self, node: fx.Node, index: Any) -> fx.Node:
        return self.call(operator.getitem, node, index)

    def buffer(self, name: str, value: torch.Tensor) -> fx.Node:
        """Register `value` as a buffer of the graph module and read it with a get_attr node."""
        self.gm.register_buffer(name, value)
        with self.gm.graph.inserting_before(self.before):
            node = self.gm.graph.get_attr(name)
        held = self.gm.get_buffer(name)
        # static: a buffer the rewrite adds has its own fixed shape (a symbol for its size would be bound by no
        # input, and splitting the graph at DDP buckets looks every symbol up)
        fake = self.fake_mode.from_tensor(held, static_shapes=True) if self.fake_mode is not None else held
        node.meta["example_value"] = node.meta["val"] = fake
        self.created.append(node)
        return node

    def rollback(self) -> None:
        """Erase the nodes this builder created that nothing reads (last first)."""
        for node in reversed(self.created):
            if not node.users:
                self.gm.graph.erase_node(node)
        self.created.clear()


__all__ = ["NodeBuilder"]
