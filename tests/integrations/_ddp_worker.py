"""One rank of a 2-process Hugging Face Trainer run under DDP (gloo on CPU), started by torchrun from
test_ddp_trainer.py; writes rank<N>.json into $RESULT_DIR.

The route: `torch._dynamo.config.optimize_ddp = False` and `model.compile(backend=almostlinear.DistributedBackend(
split_buckets=False, ...))` before the Trainer wraps the model in DDP: the backend gets the whole graph with
real inputs and decides the same on every rank (re-checks included).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers as tf  # noqa: E402

import almostlinear  # noqa: E402
from almostlinear.integrations.huggingface import ReportCallback  # noqa: E402
from tests.integrations.helpers import OPTIONS, gpt2, lm_examples  # noqa: E402

STEPS = 4


def main() -> None:
    torch.set_num_threads(1)
    torch._dynamo.config.optimize_ddp = False  # the backend gets the whole graph, with real inputs
    model = gpt2(layers=1)
    backend = almostlinear.DistributedBackend(method="polynomial", min_seq_len=0, recheck_every=2,
                                              split_buckets=False, **OPTIONS)
    model.compile(backend=backend)
    callback = ReportCallback(backend, print_reports=False)
    with tempfile.TemporaryDirectory() as out:
        args = tf.TrainingArguments(output_dir=out, max_steps=STEPS, per_device_train_batch_size=2,
                                    learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                                    use_cpu=True, disable_tqdm=True, dataloader_drop_last=True, seed=0,
                                    ddp_backend="gloo")
        trainer = tf.Trainer(model=model, args=args, train_dataset=lm_examples(STEPS * 4), callbacks=[callback])
        trainer.train()
    result = {
        "rank": torch.distributed.get_rank(),
        "world": torch.distributed.get_world_size(),
        "wrapped": type(trainer.model_wrapped).__name__,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "signature": almostlinear.assert_same_decisions(backend),  # collective: raises if the ranks differ
        "sites": [[s.module_path, s.method] for r in backend.reports for s in r.sites],
        "recheck_calls": sorted({e["call"] for e in callback.events if e["kind"] == "recheck"}),
    }
    with open(os.path.join(os.environ["RESULT_DIR"], f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f, default=str)
    # Both ranks have written their results: leave without tearing gloo down. The interpreter's teardown is
    # where this worker failed: left to exit, a gloo thread aborted one rank ("terminate called without an
    # active exception", one CI run); with destroy_process_group, rank 0 hung in the DDP Reducer's destructor
    # (~ProcessGroupGloo joining a thread that waits for the rank that had already exited; one CI run, seen
    # with py-spy), until the harness's 600 s timeout.
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
