"""Hugging Face models built from configs with random weights (never downloaded)."""
from __future__ import annotations

import torch

SEQ = 16


def build(name: str, impl: str, padding: bool = True):
    import transformers as tf

    common = dict(attn_implementation=impl, use_cache=False)
    if name == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common)
        model = tf.GPT2LMHeadModel(cfg)
    elif name == "bert":
        cfg = tf.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                            vocab_size=100, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, **common)
        model = tf.BertModel(cfg, add_pooling_layer=False)
    elif name == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                             intermediate_size=64, vocab_size=100, max_position_embeddings=64, **common)
        model = tf.LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"unknown model {name!r}; valid: gpt2, bert, llama")
    ids = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(0))
    kwargs = {}
    if padding and name in ("bert", "llama"):
        kwargs["attention_mask"] = torch.tensor([[1] * SEQ, [1] * 10 + [0] * (SEQ - 10)])
    return model, ids, kwargs
