"""A `lightning.pytorch.Callback` that shows what almostlinear did while a Lightning `Trainer` fits.

    class Lit(L.LightningModule):
        def __init__(self, model, backend):
            super().__init__()
            self.model = model
            self.model.compile(backend=backend)      # the inner model, in place
        ...

    backend = almostlinear.Backend(recheck_every=50)
    trainer = L.Trainer(callbacks=[ReportCallback(backend)], ...)
    trainer.fit(Lit(model, backend), loader)    # or trainer.fit(torch.compile(lit, backend=backend), loader)

Imports `lightning` (the unified package). The standalone `pytorch_lightning` package has its own Callback
class, which this one is not.
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from . import ReportWatcher, WatchedReports


class ReportCallback(WatchedReports, Callback):
    """After each training batch: logs (logger "almostlinear", INFO) every graph compiled since the last batch
    and every re-check event, and, with `log_metrics`, logs `almostlinear/sites`, `almostlinear/polynomial`,
    `almostlinear/exact`, `almostlinear/switched_to_exact` (and `almostlinear/grad_error` once measured) through
    `pl_module.log`, so every Lightning logger gets them. At the end of `fit`: prints the summary and every
    report with attention sites (`print_reports`; global rank 0 only).

    `source`: the `almostlinear.Backend` the model was compiled with, or None for the reports of
    `backend="almostlinear"` (string form). `.events`, `.summary()` and `.text()` as in the Trainer callback.
    """

    def __init__(self, source: Any = None, print_reports: bool = True, log_metrics: bool = True):
        self.watcher = ReportWatcher(source)
        self.print_reports = print_reports
        self.log_metrics = log_metrics
        self.printed: str | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.watcher.poll(trainer.global_step)
        if self.log_metrics:
            s = self.summary()
            metrics = {f"almostlinear/{k}": float(s[k]) for k in ("sites", "exact", "polynomial", "switched_to_exact")}
            if s["grad_error"] is not None:
                metrics["almostlinear/grad_error"] = float(s["grad_error"])
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_validation_end(self, trainer, pl_module):
        self.watcher.poll(trainer.global_step)  # validation in eval mode compiles its own graph

    def on_fit_end(self, trainer, pl_module):
        self.watcher.poll(trainer.global_step)
        if self.print_reports and trainer.is_global_zero:
            self.printed = self.text()
            print(self.printed, flush=True)
