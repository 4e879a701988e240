"""Hugging Face Trainer and Seq2SeqTrainer with a model compiled in place (`model.compile(backend=...)`)."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
import transformers as tf

import almostlinear
from almostlinear.integrations.huggingface import ReportCallback

from .helpers import OPTIONS, RecordingCollator, bart, gpt2, lm_examples, twins

STEPS = 5


def _args(tmp_path, args_cls=tf.TrainingArguments, **kw) -> tf.TrainingArguments:
    base = dict(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                dataloader_drop_last=True, seed=0)
    base.update(kw)
    return args_cls(**base)


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _train(model, tmp_path, callbacks=(), collator=None, trainer_cls=tf.Trainer, args_cls=tf.TrainingArguments, **kw):
    trainer = trainer_cls(model=model, args=_args(tmp_path, args_cls, **kw), train_dataset=lm_examples(STEPS * 4),
                          data_collator=collator or RecordingCollator(), callbacks=list(callbacks))
    trainer.train()
    return trainer


def test_trainer_with_model_compiled_in_place_equals_uncompiled_exact(tmp_path, capsys):
    model, reference = twins(gpt2)
    backend = almostlinear.Backend(method="exact", **OPTIONS)
    model.compile(backend=backend)
    assert "labels" in inspect.signature(model.forward).parameters  # what the Trainer inspects to keep columns
    callback = ReportCallback(backend)
    collator = RecordingCollator()
    trainer = _train(model, tmp_path / "compiled", callbacks=[callback], collator=collator)
    expected = _train(reference, tmp_path / "eager")

    # no dataset column the model takes was dropped; the one it does not take (doc_id) was
    assert collator.keys and all(keys == {"input_ids", "attention_mask", "labels"} for keys in collator.keys)
    sites = [s for r in backend.reports for s in r.sites]
    assert {s.module_path for s in sites} == {"transformer.h.0.attn", "transformer.h.1.attn"}, callback.text()
    assert all(s.rewritten and s.method == "exact" and s.causal for s in sites)
    losses = _losses(trainer)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(_losses(expected)), rtol=1e-5, atol=1e-6)
    # reports reachable: the callback's events, summary and printed text
    summary = callback.summary()
    assert summary["sites"] == 2 and summary["exact"] == 2 and summary["rewritten"] == 2
    assert any(e["kind"] == "compiled" and e["sites"] == 2 for e in callback.events)
    assert "transformer.h.1.attn" in capsys.readouterr().out and callback.printed


def test_trainer_polynomial_with_rechecks_reports_recheck_events(tmp_path):
    model = gpt2(layers=1)
    backend = almostlinear.Backend(method="polynomial", min_seq_len=0, recheck_every=2, **OPTIONS)
    model.compile(backend=backend)
    callback = ReportCallback(backend, print_reports=False)
    trainer = _train(model, tmp_path, callbacks=[callback])
    assert all(math.isfinite(x) for x in _losses(trainer))
    summary = callback.summary()
    assert summary["sites"] == 1 and summary["polynomial"] + summary["switched_to_exact"] == 1, callback.text()
    assert summary["grad_error"] is not None
    rechecks = [e for e in callback.events if e["kind"] == "recheck"]
    # 5 training calls, a re-check every 2nd: calls 2 and 4, each with per-site and end-to-end entries
    assert {e["call"] for e in rechecks} == {2, 4}, callback.events
    assert {e["step"] for e in rechecks} == {2, 4}  # one training call per optimizer step here


def test_seq2seq_trainer_with_model_compiled_in_place_equals_uncompiled_exact(tmp_path):
    model, reference = twins(bart)
    backend = almostlinear.Backend(method="exact", **OPTIONS)
    model.compile(backend=backend)
    callback = ReportCallback(backend, print_reports=False)
    collator = RecordingCollator()
    kw = dict(trainer_cls=tf.Seq2SeqTrainer, args_cls=tf.Seq2SeqTrainingArguments)
    trainer = _train(model, tmp_path / "compiled", callbacks=[callback], collator=collator, **kw)
    expected = _train(reference, tmp_path / "eager", **kw)
    assert all(keys == {"input_ids", "attention_mask", "labels"} for keys in collator.keys)
    sites = [s for r in backend.reports for s in r.sites]
    paths = {s.module_path for s in sites}
    assert {"model.encoder.layers.0.self_attn", "model.decoder.layers.0.self_attn",
            "model.decoder.layers.0.encoder_attn"} <= paths, callback.text()
    assert all(s.rewritten for s in sites), callback.text()
    torch.testing.assert_close(torch.tensor(_losses(trainer)), torch.tensor(_losses(expected)), rtol=1e-5, atol=1e-6)


def test_trainer_drops_every_column_of_a_torch_compile_wrapper_unless_told_not_to(tmp_path):
    """Why the README says `model.compile(...)`: the wrapper's forward is `(*args, **kwargs)`."""
    backend = almostlinear.Backend(method="exact", **OPTIONS)
    wrapper = torch.compile(gpt2(layers=1), backend=backend)
    assert set(inspect.signature(wrapper.forward).parameters) == {"args", "kwargs"}
    collator = RecordingCollator()
    with pytest.raises(Exception):
        _train(wrapper, tmp_path / "dropped", collator=collator)
    assert collator.keys and collator.keys[0] == set()  # every column removed: the model got nothing
    assert not backend.reports
    # remove_unused_columns=False keeps the columns; the dataset must then hold only what forward takes
    collator = RecordingCollator()
    trainer = tf.Trainer(model=wrapper, args=_args(tmp_path / "kept", remove_unused_columns=False, max_steps=2),
                         train_dataset=lm_examples(8, extra_column=False), data_collator=collator)
    trainer.train()
    assert collator.keys[0] == {"input_ids", "attention_mask", "labels"}
    assert sum(len(r.sites) for r in backend.reports) == 1


def test_torch_compile_backend_argument_is_rejected_by_accelerate(tmp_path, monkeypatch):
    """`TrainingArguments(torch_compile_backend="almostlinear")` reaches accelerate's TorchDynamoPlugin, which
    accepts only the names of its own enum (and no callable): that route is closed without patching accelerate."""
    from accelerate.utils import TorchDynamoPlugin

    # TrainingArguments exports the backend to the environment; restore it after the test
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "no")
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", "default")
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        args = _args(tmp_path, torch_compile_backend="almostlinear")
        tf.Trainer(model=gpt2(), args=args, train_dataset=lm_examples(4))
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        TorchDynamoPlugin(backend="almostlinear")
    with pytest.raises(AttributeError):
        TorchDynamoPlugin(backend=almostlinear.Backend())  # a callable is not accepted either
