"""How much real attention code the matcher finds: Hugging Face models (eager attention, tiny configs, random
weights) and torch.nn modules, compiled in exact mode. Per model: the softmax/SDPA calls in the captured graphs
(the total), the sites found, their mask kinds, near misses with reasons, and whether the compiled model equals
eager (outputs and every parameter gradient, fp32 round-off): a found site that is wrong shows up there.

    python benchmarks/matcher_corpus.py [--out benchmarks/results/matcher_corpus.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import almostlinear  # noqa: E402

SMALL = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128, vocab_size=128,
             max_position_embeddings=128)


def _hf(config_name: str, model_name: str, **overrides):
    def build():
        import transformers

        config = getattr(transformers, config_name)(**{**SMALL, **overrides})
        config._attn_implementation = "eager"
        model = getattr(transformers, model_name)(config).eval()
        ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(2, 32, dtype=torch.long)
        mask[1, 24:] = 0  # a padded batch: the padding mask must be found and kept
        return model, (ids,), {"attention_mask": mask}
    return build


def _nn_mha():
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    return layer, (torch.randn(2, 32, 64),), {"src_mask": torch.nn.Transformer.generate_square_subsequent_mask(32),
                                             "is_causal": True}


def _nn_mha_padding():
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True)
    x = torch.randn(2, 32, 64)
    pad = torch.zeros(2, 32, dtype=torch.bool)
    pad[1, 20:] = True

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x, pad):
            return self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    return Wrap(), (x, pad), {}


MODELS = {
    "gpt2": _hf("GPT2Config", "GPT2LMHeadModel", n_embd=64, n_head=4, n_layer=2, n_positions=128),
    "gpt_neo": _hf("GPTNeoConfig", "GPTNeoForCausalLM", num_layers=2, attention_types=[[["global", "local"], 1]],
                   window_size=8, num_heads=4),
    "opt": _hf("OPTConfig", "OPTForCausalLM", ffn_dim=128, word_embed_proj_dim=64),
    "bert": _hf("BertConfig", "BertModel"),
    "roberta": _hf("RobertaConfig", "RobertaModel", pad_token_id=1),
    "llama": _hf("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2),
    "mistral": _hf("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, sliding_window=16),
    "qwen2": _hf("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2),
    "gemma": _hf("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=2, head_dim=16),
    "gemma2": _hf("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=16,
                  attn_logit_softcapping=50.0, sliding_window=16),
    "phi": _hf("PhiConfig", "PhiForCausalLM"),
    "stablelm": _hf("StableLmConfig", "StableLmForCausalLM", num_key_value_heads=4),
    "falcon": _hf("FalconConfig", "FalconForCausalLM", new_decoder_architecture=False, multi_query=True),
    "bloom": _hf("BloomConfig", "BloomForCausalLM", n_layer=2, n_head=4),
    "gptj": _hf("GPTJConfig", "GPTJForCausalLM", n_embd=64, n_head=4, n_layer=2, rotary_dim=8, n_positions=128),
    "nn.TransformerEncoderLayer": _nn_mha,
    "nn.MultiheadAttention+padding": _nn_mha_padding,
}


def _count_attention_calls(reports) -> int:
    """Softmax and SDPA calls in the graphs as Dynamo captured them (before any rewrite)."""
    total = 0
    for report in reports:
        code = report.graph_before
        total += code.count("softmax(") - code.count("log_softmax(") + code.count("scaled_dot_product_attention(")
        total += code.count("multi_head_attention_forward(")
    return total


def _grads(model, args, kwargs, call=None):
    model.zero_grad(set_to_none=True)
    out = (model if call is None else call)(*args, **kwargs)
    tensor = out.logits if hasattr(out, "logits") else out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    g = torch.Generator().manual_seed(1)
    (tensor * torch.randn(tensor.shape, generator=g)).sum().backward()
    return tensor.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run_one(name: str, build) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, args, kwargs = build()
    ref_out, ref_grads = _grads(model, args, kwargs)
    backend = almostlinear.Backend(method="exact", inner="eager")
    compiled = torch.compile(model, backend=backend)
    out, grads = _grads(model, args, kwargs, compiled)
    equal = torch.allclose(out, ref_out, atol=1e-4, rtol=1e-4) and all(
        torch.allclose(grads[n], g, atol=1e-4, rtol=1e-3) for n, g in ref_grads.items())
    sites = [s for r in backend.reports for s in r.sites]
    misses = [m for r in backend.reports for m in r.near_misses]
    total = max(_count_attention_calls(backend.reports), len(sites))
    return {"model": name, "graphs": len(backend.reports), "calls": total, "found": len(sites),
            "kinds": sorted({s.mask_kind for s in sites}), "methods": sorted({s.method for s in sites}),
            "misses": sorted({m.reason[:70] for m in misses}), "equal": equal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    parser.add_argument("--models", nargs="*", default=sorted(MODELS), help=f"subset of {sorted(MODELS)}")
    options = parser.parse_args()
    rows = []
    for name in options.models:
        try:
            rows.append(run_one(name, MODELS[name]))
        except Exception as exc:  # noqa: BLE001 - a model this transformers version cannot build is listed
            traceback.print_exc(limit=2, file=sys.stderr)
            rows.append({"model": name, "error": f"{type(exc).__name__}: {str(exc)[:80]}"})
    lines = ["| model | graphs | attention calls | sites found | mask kinds | decisions | equals eager | near misses |",
             "|---|---|---|---|---|---|---|---|"]
    calls = found = 0
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | - | - | - | - | - | - | not built: {r['error']} |")
            continue
        calls, found = calls + r["calls"], found + r["found"]
        lines.append(f"| {r['model']} | {r['graphs']} | {r['calls']} | {r['found']} | {', '.join(r['kinds'])} | "
                     f"{', '.join(r['methods'])} | {'yes' if r['equal'] else 'NO'} | {'; '.join(r['misses']) or '-'} |")
    lines.append(f"\nfound {found} of {calls} attention calls ({100.0 * found / max(calls, 1):.1f}%); "
                 f"models not equal to eager: {[r['model'] for r in rows if not r.get('equal', True)]}")
    text = "\n".join(lines)
    print(text)
    if options.out:
        with open(options.out, "w") as f:
            f.write(f"`python benchmarks/matcher_corpus.py` (torch {torch.__version__})\n\n{text}\n")


if __name__ == "__main__":
    main()
