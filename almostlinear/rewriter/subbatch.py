"""The captured graph at a smaller batch: planning measures on a few held-out rows (issue 25, planning in seconds).

The end-to-end error is a forward+backward of the whole model, once exact and once per back-off step; at the
example's batch that is the bulk of planning (16 x 256 tokens of a 6-layer encoder: about 4 s a pass on one
thread). Run on m of the held-out rows it costs m / B of that. But Dynamo captures a graph at the example's
shapes: with static shapes the batch size is a literal in every size argument (`view(x, 16, 256, -1, 32)`,
`expand(mask, 16, -1, 256, 256)`, `arange(16)`), so the graph only runs on B rows.

`resize_batch(gm, B, m)` is a copy of the graph in which the first literal B in the size arguments of each op
that takes sizes (SIZE_METHODS, SIZE_FUNCTIONS) is m (the batch leads a size; a later B is a head count or head
dim of the same value: `view(8, 64, -1, 8)` in a batch of 8 with head dim 8). A literal B need not be the batch
even there (a sequence-first layout whose length equals the batch), so the copy is never trusted on its own:
`rows_agree` compares its exact forward on the rows with the whole batch's forward on the same rows (RNG ops off
on both sides, `DeterministicInterpreter`), and planning measures on the whole batch wherever they differ, or the
copy cannot be made or run. The rewrites planning applies (the polynomial op, its key-weight glue) take no batch
literal (`-1`, `*_like`), so a copy of a rewritten graph is right wherever the copy of the exact one is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..passes.subgraphs import copy_with_node_map
from .holdout import BatchSplit
from .measure import Measurement, detached_clones, floating_outputs, length_gates_open, run_with_grads

# call_method names whose int arguments (flat or in one tuple/list) are sizes
SIZE_METHODS = {"view", "reshape", "expand", "new_zeros", "new_ones", "new_empty"}
# functions whose int arguments are sizes: {function: positional indices of the size arguments (None: all)}
SIZE_FUNCTIONS = {
    torch.reshape: (1,), torch.Tensor.view: None, torch.Tensor.reshape: None, torch.Tensor.expand: None,
    torch.zeros: None, torch.ones: None, torch.empty: None, torch.broadcast_to: (1,),
    torch.full: (0,), torch.arange: (0,),  # arange: its end (args[1] where a start is given: _resize_node)
}
SIZE_KWARGS = {"size", "shape", "end"}  # keyword arguments that are sizes, where the call is a size op

# ops that draw random numbers: a validation run turns the dropouts off and gives up on the others
DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
            torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout}
RANDOM_FUNCTIONS = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like,
                    torch.bernoulli, torch.normal, torch.multinomial, torch.randperm, torch.poisson,
                    F.gumbel_softmax, F.rrelu}
RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_",
                  "cauchy_", "log_normal_"}


def _swap_first(value: Any, old: int, new: int) -> tuple[Any, bool]:
    """`value` with its first int `old` (in a tuple or list too) replaced by `new`, and whether there was one."""
    if isinstance(value, int) and not isinstance(value, bool) and value == old:
        return new, True
    if isinstance(value, (tuple, list)):
        items = list(value)
        for i, item in enumerate(items):
            items[i], done = _swap_first(item, old, new)
            if done:
                return type(value)(items), True
    return value, False


def _resize_node(node: fx.Node, old: int, new: int) -> None:
    """Replace the first `old` among the node's size arguments (the batch leads a size: [B, T, H, D], [B, H, T, D],
    expand(B, -1, T, S); a later equal size is a head count or a head dim of the same value, left alone)."""
    if node.op == "call_method" and node.target in SIZE_METHODS:
        positions: tuple | None = None
        first = 1  # args[0] is the tensor
    elif node.op == "call_function" and node.target in SIZE_FUNCTIONS:
        positions = SIZE_FUNCTIONS[node.target]
        if node.target is torch.arange and len(node.args) > 1:
            positions = (1,)  # arange(start, end[, step])
        first = 1 if node.target in (torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.expand) else 0
    else:
        return
    args = list(node.args)
    for i in range(first, len(args)):
        if positions is None or i in positions:
            args[i], done = _swap_first(args[i], old, new)
            if done:
                node.args = tuple(args)
                return
    kwargs = dict(node.kwargs)
    for key in sorted(SIZE_KWARGS & set(kwargs)):
        kwargs[key], done = _swap_first(kwargs[key], old, new)
        if done:
            node.kwargs = kwargs
            return


def resize_batch(gm: fx.GraphModule, size: int,
                 new_size: int) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]] | None:
    """A copy of `gm` whose size arguments say `new_size` where they said `size` (see the module docstring) and the
    map from `gm`'s nodes to the copy's, or None where the graph has bodies of its own (checkpoints, other
    higher-order ops: their literals are not reached). The copy shares the module's attributes (buffers
    included); it is not checked here (`rows_agree`)."""
    if any(isinstance(m, fx.GraphModule) for name, m in gm.named_modules() if name):
        return None
    work, node_map = copy_with_node_map(gm)
    for node in work.graph.nodes:
        _resize_node(node, size, new_size)
    work.recompile()
    return work, node_map


def has_random_ops(gm: fx.GraphModule) -> bool:
    """Whether running `gm` draws random numbers (a dropout with p = 0 or training off does not)."""
    return any(_random(node) for node in gm.graph.nodes)


def _random(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in RANDOM_METHODS or node.target == "dropout"
    if node.op != "call_function":
        return node.op == "call_module"  # an opaque module (nn.Dropout, ...): cannot tell
    if node.target in RANDOM_FUNCTIONS:
        return True
    if node.target in DROPOUTS:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return not (p == 0 or training is False)
    if node.target is F.scaled_dot_product_attention:
        p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        return p != 0
    return False


class DeterministicInterpreter(fx.Interpreter):
    """Runs a graph with its dropouts off (attention dropout included); any other random op raises
    `NotDeterministic`. For comparing two runs of a graph that differ in shape (the random draws would not).
    Reads the module's buffers as copies (an in-place update such as BatchNorm's lands on the copy)."""

    def call_function(self, target, args, kwargs):
        if target in DROPOUTS:
            return args[0] if args else kwargs["input"]
        if target is F.scaled_dot_product_attention:
            kwargs = {**kwargs, "dropout_p": 0.0}
            args = args[:4] + ((0.0,) if len(args) > 4 else ()) + args[5:]
        elif target in RANDOM_FUNCTIONS:
            raise NotDeterministic(getattr(target, "__name__", str(target)))
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if target == "dropout":
            return args[0]
        if target in RANDOM_METHODS:
            raise NotDeterministic(target)
        return super().call_method(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        raise NotDeterministic(f"module {target}")

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        is_buffer = isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
        return value.detach().clone() if is_buffer else value


class NotDeterministic(RuntimeError):
    """The graph draws random numbers other than dropout's."""


def deterministic_outputs(gm: fx.GraphModule, inputs: Sequence[Any]) -> list[torch.Tensor]:
    """The floating outputs of `gm` on `inputs` (not mutated: buffers and inputs are copies), dropouts off."""
    with torch.no_grad():
        return [o.detach() for o in floating_outputs(DeterministicInterpreter(gm).run(*detached_clones(inputs)))]


# Round-off allowed between the copy on m rows and the graph on B rows (a different matmul blocking): relative to
# each output's largest entry, at least a few units of the output dtype's rounding (bf16: 3e-2). A wrong copy (the
# sequence taken for the batch) differs by O(1).
AGREE_TOLERANCE = 1e-4


def rows_agree(sub: Sequence[torch.Tensor], full: Sequence[torch.Tensor], rows: torch.Tensor, size: int) -> bool:
    """Whether the outputs on m rows equal the whole batch's outputs: at `rows` for an output with the batch
    dimension (first size `size`), whole for any other (a loss); the same non-finite pattern, finite entries
    within AGREE_TOLERANCE of each output's scale."""
    if len(sub) != len(full):
        return False
    for s, f in zip(sub, full):
        s, f = s.detach(), f.detach()
        if f.dim() >= 1 and f.shape[0] == size:
            f = f.index_select(0, rows.to(f.device))
        if s.shape != f.shape:
            return False
        finite = torch.isfinite(f)
        if not torch.equal(finite, torch.isfinite(s)) or not torch.equal(s[~finite].float().nan_to_num(),
                                                                         f[~finite].float().nan_to_num()):
            return False
        if finite.any():
            scale = float(f[finite].abs().max().clamp_min(1e-30))
            tolerance = max(AGREE_TOLERANCE, 4 * torch.finfo(f.dtype).eps)
            if float((s[finite].float() - f[finite].float()).abs().max()) > tolerance * scale:
                return False
    return True


@dataclass
class Sample:
    """Where the end-to-end error is measured: the inputs the graphs run on, the exact gradients there, the rows
    whose outputs get cotangents (None: every row), and the batch the graphs are resized from and to (None: run
    as captured)."""

    inputs: list
    reference: Measurement
    rows: torch.Tensor | None = None
    resize: tuple[int, int] | None = None
    describe: str = ""
    fallback: Callable[[str], "Sample"] | None = None  # the whole batch, should a rewritten graph not run resized

    def measure(self, gm: fx.GraphModule, rng: torch.Tensor) -> Measurement:
        """One measuring run of a rewritten graph here; the per-site numbers keyed by `gm`'s nodes."""
        if self.resize is None:
            with length_gates_open(gm):
                return run_with_grads(gm, self.inputs, rng, rows=self.rows)
        resized = resize_batch(gm, *self.resize)
        if resized is None:
            raise RuntimeError("the rewritten graph has bodies of its own: it cannot run on fewer rows")
        work, node_map = resized
        with length_gates_open(work):
            measured = run_with_grads(work, self.inputs, rng, rows=self.rows)
        back = {new: old for old, new in node_map.items()}
        for name in ("local_errors", "head_errors", "unmeasured"):
            setattr(measured, name, {back.get(n, n): v for n, v in getattr(measured, name).items()})
        return measured


def sub_batch_sample(reference_graph: fx.GraphModule, split: BatchSplit, inputs: Sequence[Any],
                     capture: Measurement, rng: torch.Tensor, rows_wanted: int) -> tuple[Sample | None, str]:
    """The held-out rows (at most `rows_wanted`) as a batch of their own, with the exact gradients there, or
    (None, why not). What the resized graph must equal on these rows: the capture pass's outputs on them (`capture`,
    the exact forward over the whole batch) where every output has the batch dimension ("rows"); else ("repeat":
    an output mixes the rows, a loss) the exact graph's forward over these rows tiled to the example's batch, whose
    row outputs repeat and whose mean over rows is theirs (a sum over rows is not: such a graph is measured at the
    example's batch)."""
    rows = split.held_out[:rows_wanted]
    resized = resize_batch(reference_graph, split.size, len(rows))
    if resized is None:
        return None, "the graph has checkpointed or other higher-order bodies"
    work = resized[0]
    sub_inputs = split.rows_inputs(inputs, rows)
    if split.mode == "rows":  # the whole batch's outputs at these rows
        full_inputs, compared = inputs, rows
    else:  # these rows tiled to the example's batch: its first rows are them
        full_inputs = split.rows_inputs(inputs, rows[torch.arange(split.size) % len(rows)])
        compared = torch.arange(len(rows))
    try:
        reference = run_with_grads(work, sub_inputs, rng)
        if has_random_ops(reference_graph):  # compare with the dropouts off on both sides
            same = rows_agree(deterministic_outputs(work, sub_inputs),
                              deterministic_outputs(reference_graph, full_inputs), compared, split.size)
        elif split.mode == "rows":
            same = rows_agree(reference.outputs, capture.outputs, compared, split.size)
        else:
            same = rows_agree(reference.outputs, deterministic_outputs(reference_graph, full_inputs), compared,
                              split.size)
    except NotDeterministic as exc:
        return None, f"the graph draws random numbers ({exc}) other than dropout's"
    except Exception as exc:  # noqa: BLE001 - a literal that was not the batch: measure on the whole batch
        return None, f"the graph does not run on {len(rows)} rows ({type(exc).__name__}: {str(exc)[:120]})"
    if not same:
        return None, f"the graph on {len(rows)} rows does not equal the whole batch's on them"
    return Sample(sub_inputs, reference, None, (split.size, len(rows)), split.describe(rows)), ""


__all__ = ["Sample", "sub_batch_sample", "resize_batch", "has_random_ops", "deterministic_outputs", "rows_agree",
           "NotDeterministic", "SIZE_METHODS", "SIZE_FUNCTIONS"]
