"""Recipe: build the embedded `tiny-dream` and `tiny-sdar` folders (randomly initialised, seeded, reproducible).

    python -m pipeline.zoo.build_tiny_families            # writes pipeline/zoo/tiny_dream/ and tiny_sdar/
    python -m pipeline.zoo.build_tiny_families --only tiny-sdar
    python -m pipeline.zoo.build_tiny_families --out /tmp/rebuilt  # writes /tmp/rebuilt/tiny_dream/ ... instead

The remote code (configuration_*.py, modeling_*.py and the link to ../twin_layers.py) lives in each folder
and is kept; this writes config.json, model.safetensors (fp32, < 2 MB), the tokenizer (tiny-llada's, copied)
and README.md.
The models are NOT trained: they exercise the Dream (Qwen2) and SDAR (Qwen3, block diffusion) layouts
in the pipeline, not scores.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline.zoo.tiny_tokenizer import copy_tokenizer

ZOO = Path(__file__).parent
SEED = 0
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)

CARD = """---
license: apache-2.0
library_name: transformers
tags: [{tags}, toy, sinkprune, random-init]
---

# {name}

{what} at toy size, **randomly initialised (seed {seed}), not trained**: its scores are those of a random
model (held-out perplexity near the vocabulary size).  It exists so that the pipeline runs offline on this
family's module layout and attention{why}.  Rebuild it bit for bit with
`python -m pipeline.zoo.build_tiny_families --only {name}`.

| | |
|---|---|
| layers / hidden / MLP | {num_hidden_layers} / {hidden_size} / {intermediate_size} (SwiGLU) |
| heads / kv heads (GQA) | {num_attention_heads} / {num_key_value_heads} |
| attention | {attention} |
| norm / positions / biases | pre-norm RMSNorm / RoPE / {biases} |
| vocabulary | tiny-llada's 4096-token BPE (mask `<|mdm_mask|>`, id {mask}; the real model's is {real_mask}), LM head tied to the embedding |
| parameters | {params:,} (fp32 safetensors) |

Module names: `model.embed_tokens`, `model.layers.{{i}}.{{input_layernorm, self_attn.{{q,k,v,o}}_proj, {extra}
post_attention_layernorm, mlp.{{gate,up,down}}_proj}}`, `model.norm`.

```python
from pipeline.model.loading import load_dlm
model, tokenizer = load_dlm("{name}")     # AutoModel, trust_remote_code=True
```
"""

FAMILIES = {
    "tiny-dream": dict(
        folder="tiny_dream", module="configuration_dream", config_cls="DreamConfig", modeling="modeling_dream",
        model_cls="DreamModel", extra_config={},
        card=dict(tags="dream, qwen2", what="The layout of Dream-org's Dream-v0-7B / Dream-Coder-7B (a Qwen2 decoder as a masked diffusion LM)",
                  why="", attention="bidirectional (boolean padding mask only)", biases="on q/k/v (Qwen2)",
                  real_mask="151666", extra="")),
    "tiny-sdar": dict(
        folder="tiny_sdar", module="configuration_sdar", config_cls="SDARConfig", modeling="modeling_sdar",
        model_cls="SDARForCausalLM", extra_config=dict(block_length=8),
        card=dict(tags="sdar, fast-dllm-v2, block-diffusion, qwen3",
                  what="The layout of JetLM's SDAR (block diffusion on a Qwen3 decoder, like Fast-dLLM v2)",
                  why=" (a block-causal mask the sink statistics must respect)",
                  attention="block diffusion: causal across blocks of 8 tokens, bidirectional within one; boolean 4D mask to SDPA",
                  biases="none; per-head q/k RMSNorm (Qwen3)", real_mask="not confirmed here (set it explicitly)",
                  extra="self_attn.{{q,k}}_norm,")),
}


def _classes(name: str):
    import importlib

    spec = FAMILIES[name]
    package = f"pipeline.zoo.{spec['folder']}"
    config_cls = getattr(importlib.import_module(f"{package}.{spec['module']}"), spec["config_cls"])
    model_cls = getattr(importlib.import_module(f"{package}.{spec['modeling']}"), spec["model_cls"])
    return config_cls, model_cls


def make_config(name: str, tokenizer):
    spec = FAMILIES[name]
    config_cls, model_cls = _classes(name)
    return config_cls.for_tokenizer(tokenizer, model_cls, ("AutoModel",), **SIZES, **spec["extra_config"])


def build(name: str, folder: Path | None = None, seed: int = SEED):
    from transformers import AutoTokenizer

    spec = FAMILIES[name]
    folder = folder or ZOO / spec["folder"]
    copy_tokenizer(ZOO / "tiny_llada", folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = make_config(name, tokenizer)
    torch.manual_seed(seed)
    model = _classes(name)[1](config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    card = CARD.format(name=name, seed=seed, params=params, mask=config.mask_token_id, **SIZES, **spec["card"])
    (folder / "README.md").write_text(card.replace("{{", "{").replace("}}", "}") if "{{" in card else card)
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(FAMILIES), default=None)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=ZOO,
                        help="folder that receives tiny_dream/ and tiny_sdar/ (default: the zoo)")
    args = parser.parse_args()
    for name in [args.only] if args.only else sorted(FAMILIES):
        folder = args.out / FAMILIES[name]["folder"]
        build(name, folder, seed=args.seed)
        print(f"wrote {folder}")
