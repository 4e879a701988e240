"""Runs Lightning fits in a fresh interpreter and prints one JSON line per route (see test_lightning.py).

Importing `lightning` replaces `torch.compile` for the whole process (lightning.fabric.wrappers wraps it to
deep-copy its keyword arguments), so the Lightning tests run here, not in the pytest process.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import almostlinear.integrations  # noqa: E402,F401  - first: it must import none of the optional libraries

OPTIONAL_IMPORTED = sorted(m for m in ("lightning", "transformers", "accelerate") if m in sys.modules)

import lightning as L  # noqa: E402
import torch  # noqa: E402

import almostlinear  # noqa: E402
from almostlinear.integrations.lightning import ReportCallback  # noqa: E402
from tests.integrations.helpers import OPTIONS, RecordingCollator, gpt2, lm_examples, twins  # noqa: E402

STEPS = 5
LAYERS = {"inner_model": 2, "lightning_compile": 1}


class LitLM(L.LightningModule):
    def __init__(self, model, backend=None):
        super().__init__()
        self.model = model
        if backend is not None:
            self.model.compile(backend=backend)  # the inner model, in place
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def fit(module, callbacks=()):
    torch.manual_seed(0)
    collator = RecordingCollator()
    loader = torch.utils.data.DataLoader(lm_examples(STEPS * 4), batch_size=4, collate_fn=collator)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, loader)
    return trainer, collator


def run(route: str) -> dict:
    torch._dynamo.reset()
    model, reference = twins(gpt2, layers=LAYERS[route])
    if route == "inner_model":
        backend = almostlinear.Backend(method="exact", **OPTIONS)
        lit = LitLM(model, backend)
        fitted, callback = lit, ReportCallback(backend)
    else:  # Lightning's own route: it unwraps torch.compile's module and compiles forward and training_step.
        # Lightning's torch.compile wrapper deep-copies its keyword arguments: a Backend copies as itself, so its
        # reports are the ones the callback reads
        lit = LitLM(model)
        known = {id(r) for r in almostlinear.last_reports()}
        backend = almostlinear.Backend(method="exact", **OPTIONS)
        fitted = torch.compile(lit, backend=backend)
        callback = ReportCallback(backend)
    trainer, collator = fit(fitted, [callback])
    expected = LitLM(reference)
    fit(expected)
    reports = callback.reports()
    if route != "inner_model":
        reports = [r for r in reports if id(r) not in known]
    return {
        "route": route,
        "layers": LAYERS[route],
        "losses": lit.losses,
        "expected": expected.losses,
        "sites": [[s.module_path, s.method, s.rewritten] for r in reports for s in r.sites],
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("almostlinear/")},
        "printed": callback.printed,
        "columns": sorted(collator.keys[0]),
        "events": [e["kind"] for e in callback.events],
    }


if __name__ == "__main__":
    print("IMPORTED " + json.dumps(OPTIONAL_IMPORTED), flush=True)
    for route in sys.argv[1:]:
        print("RESULT " + json.dumps(run(route)), flush=True)
