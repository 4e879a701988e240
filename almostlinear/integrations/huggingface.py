"""A `transformers.TrainerCallback` that shows what almostlinear did while a `Trainer` trains.

    backend = almostlinear.Backend(method="auto", recheck_every=50)
    model.compile(backend=backend)                  # in place: the Trainer still sees the model's forward signature
    callback = ReportCallback(backend)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()                                 # prints the reports at the end (main process only)
    callback.summary()                              # {"sites": 2, "polynomial": 2, "grad_error": ..., ...}

Works the same for `Seq2SeqTrainer` and any other `Trainer` subclass. Imports transformers.
"""
from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from . import ReportWatcher, WatchedReports


class ReportCallback(WatchedReports, TrainerCallback):
    """After each optimizer step: logs (logger "almostlinear", INFO) every graph compiled since the last
    step, with its sites and decisions, and every re-check event (`recheck_every`) with its measured error.
    At the end of training: prints the summary and every report with attention sites (`print_reports`;
    on the main process only).

    `source`: the `almostlinear.Backend` passed to `model.compile(backend=...)`, a model compiled by
    `almostlinear.compile_for_ddp`, or None for the reports of `backend="almostlinear"` (string form).
    `.events` keeps everything logged (dicts with "kind": "compiled" | "recheck", the training "step" and the
    numbers); `.summary()` and `.text()` give the current state of the reports.
    """

    def __init__(self, source: Any = None, print_reports: bool = True):
        self.watcher = ReportWatcher(source)
        self.print_reports = print_reports
        self.printed: str | None = None

    def on_step_end(self, args, state, control, **kwargs):
        self.watcher.poll(state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        self.watcher.poll(state.global_step)  # evaluation in eval mode compiles its own graph

    def on_train_end(self, args, state, control, **kwargs):
        self.watcher.poll(state.global_step)
        if self.print_reports and state.is_world_process_zero:
            self.printed = self.text()
            print(self.printed, flush=True)
