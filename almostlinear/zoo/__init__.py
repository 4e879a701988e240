"""Models to inspect and test with, built from configs with random weights (never downloaded, nothing fetched).

    build(name, impl="eager" | "sdpa", padding=True, layers=2, seq_len=16) -> (model, input_ids, kwargs)
        small Hugging Face models (`hf.py`; needs `transformers`)
    GPT(GPTConfig(...)), timed_step(...)
        the nanoGPT-style example model the examples, tests and benchmarks compile (`gpt.py`)
    data.stdlib_text(), data.split(...), data.batches(...)
        the text they train on: the standard library's source as bytes, a held-out split, seeded batches
    layer.AttentionLayer, layer.heavy_tailed_batches(...)
        one attention layer and batches with a few far sharper rows (the budget on later batches)
"""
from .gpt import GPT, GPTConfig, timed_step
from .hf import IMPLEMENTATIONS, MODELS, SEQ, build

__all__ = ["GPT", "GPTConfig", "IMPLEMENTATIONS", "MODELS", "SEQ", "build", "timed_step"]
