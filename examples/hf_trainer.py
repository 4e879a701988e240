"""Fine-tune a small Hugging Face GPT-2 with the `Trainer` and backend="almostlinear" (polynomial attention),
then print what the backend did; the same run without compilation gives the reference loss.

    python examples/hf_trainer.py                        # 40 steps at 256 tokens, 1-1.5 minutes on 2 CPU cores
    python examples/hf_trainer.py --steps 100 --seq-len 1024 --inner inductor --device cuda

The model is built from a config with random weights (nothing is downloaded); the text is the Python
standard library's own source, read as bytes (vocabulary 256, no tokenizer needed).

The route shown: compile the model *in place* (`model.compile(backend=backend)`) before handing it to the
Trainer. Not `torch.compile(model)` (the Trainer reads the wrapper's `(*args, **kwargs)` signature and drops
every dataset column), and not `TrainingArguments(torch_compile_backend="almostlinear")` (accelerate accepts
only its own list of backend names).
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers as tf  # noqa: E402

import almostlinear  # noqa: E402
from almostlinear.integrations.huggingface import ReportCallback  # noqa: E402
from almostlinear.zoo.data import stdlib_text  # noqa: E402


def examples(n: int, seq_len: int) -> list[dict]:
    """n causal-LM examples of seq_len bytes (labels = inputs; the model shifts them)."""
    data = stdlib_text(n * seq_len)
    rows = []
    for i in range(n):
        ids = data[i * seq_len: (i + 1) * seq_len].clone()
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def small_gpt2(layers: int, seq_len: int, seed: int = 0) -> tf.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(n_layer=layers, n_head=2, n_embd=64, vocab_size=256, n_positions=seq_len,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        attn_implementation="eager", use_cache=False)  # head dim 32
    return tf.GPT2LMHeadModel(cfg)


def train(model, rows, args: argparse.Namespace, out: str, callbacks=()) -> tf.Trainer:
    targs = tf.TrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        warmup_steps=0, logging_steps=max(1, args.steps // 4), report_to=[], save_strategy="no",
        use_cpu=args.device == "cpu", disable_tqdm=True, dataloader_drop_last=True, seed=0)
    trainer = tf.Trainer(model=model, args=targs, train_dataset=rows, callbacks=list(callbacks))
    trainer.train()
    return trainer


def final_loss(trainer: tf.Trainer) -> float:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--recheck-every", type=int, default=10)
    p.add_argument("--inner", default="aot_eager", choices=("inductor", "aot_eager", "eager"),
                   help="compiler for the rewritten graph (Inductor is faster to run, slow to compile on a CPU)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--no-reference", action="store_true", help="skip the uncompiled reference run")
    args = p.parse_args()

    rows = examples(args.steps * args.batch, args.seq_len)
    model = small_gpt2(args.layers, args.seq_len)
    reference = copy.deepcopy(model)

    # polynomial attention at every supported site, whatever the length (min_seq_len=0); every
    # recheck_every-th training call measures (and the report records) its distance to softmax attention
    backend = almostlinear.Backend(method="polynomial", min_seq_len=0, recheck_every=args.recheck_every,
                                   inner=args.inner)
    model.compile(backend=backend)  # in place: same class, same forward signature for the Trainer
    callback = ReportCallback(backend)  # prints the reports at the end of training

    with tempfile.TemporaryDirectory() as out:
        print(f"GPT-2 ({args.layers} layers, head dim 32) on {len(rows)} x {args.seq_len} bytes of stdlib "
              f"source, {args.steps} steps, method='polynomial'")
        trainer = train(model, rows, args, out, [callback])
        loss = final_loss(trainer)
        if not args.no_reference:
            print("\nreference run: the same model and batches, uncompiled (eager softmax attention)")
            ref_loss = final_loss(train(reference, rows, args, out))
    print(f"\nfinal training loss: almostlinear {loss:.4f}" + ("" if args.no_reference else
                                                             f", uncompiled {ref_loss:.4f}"))
    s = callback.summary()
    print(f"sites: {s['sites']}, polynomial now: {s['polynomial']}, switched to exact by re-checks: "
          f"{s['switched_to_exact']}, re-check events: {sum(e['kind'] == 'recheck' for e in callback.events)}")


if __name__ == "__main__":
    main()
