"""The exact-mode oracle: compiled outputs and every gradient equal eager (fp32 round-off)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

import almostlinear


def _clone_inputs(inputs: Sequence[Any]) -> list[Any]:
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            out.append(x.detach().clone().requires_grad_(True))
        elif isinstance(x, torch.Tensor):
            out.append(x.clone())
        else:
            out.append(x)
    return out


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "values"):
        return [t for v in out.values() for t in _flat_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat_outputs(v)]
    return []


def _run(fn: Callable, inputs: Sequence[Any], params: list[torch.nn.Parameter], seed: int = 0):
    args = _clone_inputs(inputs)
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    outputs = [o for o in _flat_outputs(fn(*args)) if o.is_floating_point()]
    torch.manual_seed(1234)
    cotangents = [torch.randn_like(o) for o in outputs]
    loss = sum((o * c).sum() for o, c in zip(outputs, cotangents) if o.requires_grad)
    grads = []
    if isinstance(loss, torch.Tensor):
        loss.backward()
        grads = [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grads += [p.grad for p in params]
    return [o.detach() for o in outputs], [g for g in grads]


def assert_exact_oracle(
    fn: Callable,
    inputs: Sequence[Any],
    *,
    inner: str = "aot_eager",
    dynamic: bool | None = False,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    expect_sites: int | None = None,
    **options: Any,
) -> almostlinear.Report:
    """Compile `fn` with method="exact", compare outputs and gradients to eager, return the report."""
    torch._dynamo.reset()
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    ref_out, ref_grads = _run(fn, inputs, params)
    backend = almostlinear.Backend(method="exact", inner=inner, **options)
    compiled = torch.compile(fn, backend=backend, dynamic=dynamic)
    out, grads = _run(compiled, inputs, params)
    assert len(out) == len(ref_out)
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=True)
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        if b is None:
            assert a is None or not a.abs().any()
            continue
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    report = almostlinear.rewriter.merge_reports(backend.reports, getattr(fn, "__name__", type(fn).__name__))
    if expect_sites is not None:
        # Dynamo may capture the same code twice (a restart under dynamic shapes); count distinct sites
        distinct = {(s.module_path, s.source_line) for s in report.sites}
        assert len(distinct) == expect_sites, str(report)
    return report
