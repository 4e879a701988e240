"""Planning on one part of the example batch and measuring on the other (issue 25: the budget must hold on the
batches that follow, not only on the one it was planned on).

Calibration chooses coefficients and heads on the captured q/k/v; measuring the end-to-end gradient error on
those same rows rewards that choice for fitting them (measured on a character-level GPT: the following batches'
errors were up to 1.9x the planning batch's). So the batch rows are split: calibration sees the even rows, and
the error is measured on the odd rows, which nothing was chosen on. Where every floating output of the graph
has the batch dimension ("rows": logits, hidden states), the exact forward over the whole batch captures the
calibration rows' q/k/v, and the error is measured on up to `measure_rows` held-out rows run as a batch of their
own (rewriter/subbatch.py: a copy of the graph resized to that batch, checked against the whole batch's outputs
on those rows); where that copy cannot be made or does not agree, on the whole batch with cotangents zero on
the calibration rows, so the gradients are the held-out rows' alone. Where an output mixes the rows (a loss
computed inside the model: "repeat"), the resized copy is checked against the exact graph on those rows tiled to
the example's batch (a loss that is a mean over rows is then theirs); where that fails, the graph, captured at the
example's shapes, runs on a batch of the held-out rows repeated to the same size, one extra reference pass. With
one row, or inputs whose batch dimension cannot be told, nothing is held out and the figure is in-sample (the
report says which).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..passes.graph_utils import INPUT, concrete_int, example_value, placeholder_kinds


@dataclass(frozen=True)
class BatchSplit:
    """Rows `fit` of the example batch calibrate; rows `held_out` (repeated to the batch size) measure."""

    size: int  # the batch size B
    fit: torch.Tensor  # row indices, int64
    held_out: torch.Tensor  # row indices, int64
    inputs: tuple[int, ...]  # the positions of the inputs that carry the batch dimension (dim 0)
    mode: str = "repeat"  # "rows": cotangents on the held-out rows of the whole batch; "repeat": see above

    def cotangent_rows(self) -> torch.Tensor | None:
        """The rows whose outputs get cotangents ("rows" mode; None: every row)."""
        return self.held_out if self.mode == "rows" else None

    def held_out_inputs(self, inputs: Sequence[Any]) -> list[Any]:
        """The example inputs with their batch rows replaced by the held-out rows, repeated to size B."""
        return self.rows_inputs(inputs, self.held_out[torch.arange(self.size) % len(self.held_out)])

    def rows_inputs(self, inputs: Sequence[Any], rows: torch.Tensor) -> list[Any]:
        """The example inputs with these rows as their batch (an int input equal to B, a dynamic batch size,
        becomes the number of rows)."""
        def pick(i: int, x: Any) -> Any:
            if i in self.inputs:
                return x.index_select(0, rows.to(x.device))
            if isinstance(x, int) and not isinstance(x, bool) and x == self.size:
                return len(rows)
            return x
        return [pick(i, x) for i, x in enumerate(inputs)]

    def fit_rows(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """A captured value's calibration rows (values without this batch dimension are left whole)."""
        if x is None or x.dim() == 0 or x.shape[0] != self.size:
            return x
        return x.index_select(0, self.fit.to(x.device))

    def describe(self, measured: torch.Tensor | None = None, why_all: str = "") -> str:
        """What the planning figure covers: the held-out rows it was measured on (`measured`: a subset of them,
        run as a batch of their own; `why_all`: why it took all of them at the example's batch)."""
        if measured is not None:
            return (f"measured on held-out rows {_rows(measured)} of the example batch, run as a batch of "
                    f"{len(measured)} (coefficients and heads chosen on rows {_rows(self.fit)})")
        note = f"; not on fewer rows: {why_all}" if why_all else ""
        return (f"measured on held-out rows {_rows(self.held_out)} of the example batch (coefficients and heads "
                f"chosen on rows {_rows(self.fit)}{note})")


def _rows(index: torch.Tensor) -> str:
    rows = index.tolist()
    return ", ".join(map(str, rows)) if len(rows) <= 4 else f"{rows[0]}, {rows[1]}, ..., {rows[-1]}"


IN_SAMPLE = "measured on the example batch it was planned on (in-sample: {why})"


def _outputs_have_rows(gm: fx.GraphModule, size: int) -> bool:
    """Every floating output of the graph has the batch dimension first (its rows are the batch's rows)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat: list = []
    fx.node.map_arg(output.args, flat.append)
    values = [example_value(n) for n in flat]
    floating = [x for x in values if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return bool(floating) and all(x.dim() >= 1 and concrete_int(x.shape[0]) == size for x in floating)


def batch_split(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[BatchSplit | None, str]:
    """The split of the user's data inputs (placeholders that are neither parameters nor buffers) along their
    common dim 0, or (None, why not). Every data tensor must have that dim 0 (or 1: broadcast over the batch);
    any other size makes the batch dimension ambiguous, and nothing is held out."""
    kinds = placeholder_kinds(gm, inputs)
    data = [(i, x) for i, (node, x) in enumerate(zip(kinds, inputs))
            if kinds[node] == INPUT and isinstance(x, torch.Tensor) and x.dim() >= 1]
    sizes = {int(x.shape[0]) for _, x in data} - {1}
    if 0 in sizes:
        return None, "the batch is empty"
    if not sizes:
        return None, "no input has a batch dimension larger than 1"
    if len(sizes) > 1:
        return None, f"the inputs' first dimensions differ ({sorted(sizes)}): no batch dimension to split"
    size = sizes.pop()
    rows = torch.arange(size)
    # interleaved (not halves): data sorted along the batch (by length, by source) falls on both sides, and under
    # DDP the union of the ranks' calibration rows is what one process would calibrate on with the ranks'
    # batches concatenated (even per-rank batch sizes)
    mode = "rows" if _outputs_have_rows(gm, size) else "repeat"
    split = BatchSplit(size, rows[0::2], rows[1::2], tuple(i for i, x in data if x.shape[0] == size), mode)
    return split, ""


__all__ = ["BatchSplit", "batch_split", "IN_SAMPLE"]
