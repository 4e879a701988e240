"""Tiny models and data for the integration tests: Hugging Face models built from configs (random weights,
nothing downloaded) trained on bytes of the Python standard library's source (vocabulary 256)."""
from __future__ import annotations

import copy

import torch

from almostlinear.zoo.data import stdlib_text  # bytes of the standard library's .py files, vocabulary 256

SEQ = 32
OPTIONS = dict(inner="aot_eager")  # Inductor compiles are slow on a CPU; the rewrite is the same


def lm_examples(n: int, seq_len: int = SEQ, extra_column: bool = True, offset: int = 0) -> list[dict]:
    """Causal-LM examples (input_ids, attention_mask, labels), plus a `doc_id` column the model does not take."""
    data = stdlib_text(200_000)
    rows = []
    for i in range(n):
        ids = data[offset + i * seq_len: offset + (i + 1) * seq_len].clone()
        row = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if extra_column:
            row["doc_id"] = i
        rows.append(row)
    return rows


def gpt2(seed: int = 0, layers: int = 2, impl: str = "eager"):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.GPT2Config(n_layer=layers, n_head=2, n_embd=32, vocab_size=256, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation=impl,
                        use_cache=False)
    return tf.GPT2LMHeadModel(cfg)


def bart(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.BartConfig(vocab_size=256, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, attn_implementation="eager",
                        use_cache=False)
    return tf.BartForConditionalGeneration(cfg)


def twins(build, **kwargs):
    """Two models with the same weights: one to compile, one to train uncompiled."""
    model = build(**kwargs)
    return model, copy.deepcopy(model)


class RecordingCollator:
    """The default collator (stack tensors), recording the keys it received: the columns that reached the model."""

    def __init__(self):
        self.keys: list[set] = []

    def __call__(self, features: list[dict]) -> dict:
        self.keys.append(set(features[0]))
        return {k: torch.stack([torch.as_tensor(f[k]) for f in features]) for k in features[0]}
