"""Hugging Face models to inspect and test with, built from configs with random weights (never downloaded,
nothing fetched).

    build(name, impl="eager" | "sdpa", padding=True, layers=2, seq_len=16) -> (model, input_ids, kwargs)
"""
from __future__ import annotations

import torch

SEQ = 16
MODELS = ("gpt2", "bert", "llama", "mistral")
IMPLEMENTATIONS = ("eager", "sdpa")


def build(name: str, impl: str = "eager", padding: bool = True, layers: int = 2, seq_len: int = SEQ):
    """A small HF model with random weights and example inputs. Raises ValueError naming valid choices."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    import transformers as tf

    common = dict(attn_implementation=impl, use_cache=False)
    if name == "gpt2":
        cfg = tf.GPT2Config(n_layer=layers, n_head=2, n_embd=32, vocab_size=100, n_positions=max(64, seq_len),
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common)
        model = tf.GPT2LMHeadModel(cfg)
    elif name == "bert":
        cfg = tf.BertConfig(num_hidden_layers=layers, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                            vocab_size=100, max_position_embeddings=max(64, seq_len), hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, **common)
        model = tf.BertModel(cfg, add_pooling_layer=False)
    elif name == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                             intermediate_size=64, vocab_size=100, max_position_embeddings=max(64, seq_len), **common)
        model = tf.LlamaForCausalLM(cfg)
    else:  # mistral: sliding-window attention
        cfg = tf.MistralConfig(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                               intermediate_size=64, vocab_size=100, max_position_embeddings=max(64, seq_len),
                               sliding_window=max(4, seq_len // 2), **common)
        model = tf.MistralForCausalLM(cfg)
    ids = torch.randint(0, 100, (2, seq_len), generator=torch.Generator().manual_seed(0))
    kwargs = {}
    if padding and name in ("bert", "llama"):
        keep = seq_len * 5 // 8
        kwargs["attention_mask"] = torch.tensor([[1] * seq_len, [1] * keep + [0] * (seq_len - keep)])
    return model, ids, kwargs
