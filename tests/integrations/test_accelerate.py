"""Plain accelerate: `Accelerator.prepare` with a model compiled in place, or with torch.compile's wrapper."""
from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

import almostlinear
from almostlinear.integrations import ReportWatcher

from .helpers import OPTIONS, RecordingCollator, gpt2, lm_examples, twins

STEPS = 5


def _loop(model, accelerator: Accelerator, watcher: ReportWatcher | None = None) -> list[float]:
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(lm_examples(STEPS * 4, extra_column=False), batch_size=4,
                                         collate_fn=RecordingCollator())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    losses = []
    for step, batch in enumerate(loader, 1):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if watcher is not None:
            watcher.poll(step)
    return losses


@pytest.mark.parametrize("how", ["in_place", "wrapper"])
def test_accelerator_prepare_compiled_model_equals_uncompiled_exact(how):
    layers = 2 if how == "in_place" else 1
    model, reference = twins(gpt2, layers=layers)
    backend = almostlinear.Backend(method="exact", **OPTIONS)
    if how == "in_place":
        model.compile(backend=backend)  # accelerate's dynamo plugin stays "no": it does not compile again
    else:
        model = torch.compile(model, backend=backend)  # accelerate sees a compiled module and keeps it
    watcher = ReportWatcher(backend)
    losses = _loop(model, Accelerator(cpu=True), watcher)
    expected = _loop(reference, Accelerator(cpu=True))
    assert all(math.isfinite(x) for x in losses)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    sites = [s for r in backend.reports for s in r.sites]
    assert {s.module_path for s in sites} == {f"transformer.h.{i}.attn" for i in range(layers)}, watcher.text()
    assert all(s.rewritten and s.method == "exact" for s in sites)
    assert watcher.summary()["rewritten"] == layers
    assert [e["step"] for e in watcher.events if e["kind"] == "compiled" and e["sites"]] == [1]


def test_accelerator_dynamo_backend_takes_only_its_own_names(monkeypatch):
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        Accelerator(cpu=True, dynamo_backend="almostlinear")
