"""Recipe: build the embedded `tiny-llada-moe` folder (randomly initialised, seeded, reproducible).

    python -m pipeline.zoo.build_tiny_moe                      # writes pipeline/zoo/tiny_llada_moe/
    python -m pipeline.zoo.build_tiny_moe --out /tmp/rebuilt   # writes that folder instead

The remote code (configuration_llada_moe.py, modeling_llada_moe.py and the link to ../twin_layers.py) lives in
that folder and is kept;
this writes config.json, model.safetensors (fp32, ~1.6 MB), the tokenizer (tiny-llada's, copied) and README.md.
The model is NOT trained: it exists to exercise the MoE layout (routers, more experts than blocks,
top-2 routing, block-causal masks) in the pipeline, not to score well.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline.zoo.tiny_llada_moe.configuration_llada_moe import LLaDAMoEConfig
from pipeline.zoo.tiny_llada_moe.modeling_llada_moe import LLaDAMoEModelLM
from pipeline.zoo.tiny_tokenizer import copy_tokenizer

ZOO = Path(__file__).parent
FOLDER = ZOO / "tiny_llada_moe"
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
             num_experts_per_tok=2, expert_intermediate_size=32, max_position_embeddings=512, block_length=32)
SEED = 0


def make_config(tokenizer) -> LLaDAMoEConfig:
    return LLaDAMoEConfig.for_tokenizer(tokenizer, LLaDAMoEModelLM, **SIZES)


def new_model(config: LLaDAMoEConfig, seed: int = SEED) -> LLaDAMoEModelLM:
    torch.manual_seed(seed)
    return LLaDAMoEModelLM(config).eval()


CARD = """---
license: apache-2.0
library_name: transformers
tags: [llada-moe, llada2, moe, toy, sinkprune, random-init]
---

# tiny-llada-moe

The layout of inclusionAI's LLaDA-MoE-7B-A1B / LLaDA2 (mixture-of-experts masked diffusion LMs) at toy size,
**randomly initialised (seed {seed}), not trained**: its scores are those of a random model (held-out
perplexity near the vocabulary size).  It exists so that the pipeline's MoE paths (block detection with
more experts than blocks, routed-token statistics, routers left dense, block-causal attention masks) run
offline in tests.  Rebuild it bit for bit with `python -m pipeline.zoo.build_tiny_moe`.

| | |
|---|---|
| layers / hidden | {num_hidden_layers} / {hidden_size} |
| heads / kv heads (GQA) | {num_attention_heads} / {num_key_value_heads} |
| MoE | {num_experts} SwiGLU experts per layer (hidden {expert_intermediate_size}), top-{num_experts_per_tok} softmax routing, renormalised |
| attention | bidirectional; `block_causal: true` gives LLaDA2's block-diffusion mask (block length {block_length}, additive) |
| norm / positions / biases | pre-norm RMSNorm / RoPE / none |
| vocabulary | tiny-llada's 4096-token BPE (mask `<|mdm_mask|>`), LM head tied to the embedding |
| parameters | {params:,} (fp32 safetensors) |

Module names: `model.embed_tokens`, `model.layers.{{i}}.{{input_layernorm, self_attn.{{q,k,v,o}}_proj,
post_attention_layernorm, mlp.gate, mlp.experts.{{j}}.{{gate,up,down}}_proj}}`, `model.norm`.  While an expert
runs, `expert.routed_tokens` holds the flat [B·L] indices of the tokens routed to it (read by sinkprune's
PruneCallback to weight each routed row by its own token's sink weight).

```python
from pipeline.model.loading import load_dlm
model, tokenizer = load_dlm("tiny-llada-moe")     # AutoModel, trust_remote_code=True
```
"""


def build(folder: Path = FOLDER, seed: int = SEED) -> LLaDAMoEModelLM:
    from transformers import AutoTokenizer

    copy_tokenizer(ZOO / "tiny_llada", folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = new_model(make_config(tokenizer), seed)
    model.save_pretrained(folder, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    (folder / "README.md").write_text(CARD.format(seed=seed, params=params, **SIZES))
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FOLDER)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    build(args.out, args.seed)
    print(f"wrote {args.out}")
