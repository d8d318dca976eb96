"""Recipe: build the embedded `tiny-diffgemma` folder, a toy DiffusionGemma (randomly initialised, seeded).

    python -m pipeline.zoo.build_tiny_native                  # writes pipeline/zoo/tiny_diffgemma/
    python -m pipeline.zoo.build_tiny_native --out /tmp/dg    # anywhere else

DiffusionGemma is native in transformers 5 (`DiffusionGemmaForBlockDiffusion`, model_type "diffusion_gemma";
5.24 ships it): a causal prompt encoder and a bidirectional diffusion decoder over a canvas that share their
layer weights, attention through `ALL_ATTENTION_FUNCTIONS`, noise by random tokens.  So this is no twin with
code of its own: it is transformers' own class at toy size, loaded without `trust_remote_code`.  It needs a
transformers that has the class (none of 4.x does).  It writes config.json, model.safetensors (fp32), the
tokenizer (tiny-llada's, copied) and README.md.  The model is NOT trained: it exercises the layout, the
attention path and random-token noise in the pipeline, not scores.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from pipeline.zoo.tiny_tokenizer import copy_tokenizer

ZOO = Path(__file__).parent
NAME, FOLDER = "tiny-diffgemma", ZOO / "tiny_diffgemma"
SEED = 0
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, global_head_dim=16, max_position_embeddings=512, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"], num_experts=4, top_k_experts=2,
            moe_intermediate_size=16)
VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8, position_embedding_size=16)
CANVAS = 32

CARD = """---
license: apache-2.0
library_name: transformers
tags: [diffusion-gemma, block-diffusion, uniform-noise, toy, sinkprune, random-init]
---

# tiny-diffgemma

Google's DiffusionGemma layout (`DiffusionGemmaForBlockDiffusion`, native in transformers 5) at toy size,
**randomly initialised (seed {seed}), not trained**: structure only; its scores are those of a random model.
It exists so that the pipeline runs offline on a native transformers-5 diffusion LM whose attention goes
through `ALL_ATTENTION_FUNCTIONS` and whose forward process writes random tokens (`noise: uniform`), not a
`[MASK]`.  Rebuild it bit for bit with `python -m pipeline.zoo.build_tiny_native` (transformers {version}).

| | |
|---|---|
| layers / hidden / dense MLP | {num_hidden_layers} / {hidden_size} / {intermediate_size} (GeGLU); encoder = decoder (tied) |
| MoE in every layer | {num_experts} experts (fused 3-D weights), top-{top_k_experts}, hidden {moe_intermediate_size} |
| heads / kv heads | {num_attention_heads} / {num_key_value_heads}, q/k RMSNorm; layer types {layer_types} |
| encoder / decoder | causal over the prompt (writes the KV cache) / bidirectional over canvas ({canvas}) + cache |
| vision tower | a one-layer Gemma 4 vision encoder (built by the class; unused on text) |
| vocabulary | tiny-llada's 4096-token BPE, LM head tied to the embedding |
| parameters | {params:,} (fp32 safetensors, without tied copies) |

In sinkprune a calibration or scoring window is the decoder's canvas behind an empty prompt
(`pipeline.model.loading.dlm_forward`); the pruned layers are the decoder's, whose weights the encoder shares.

```python
from pipeline.model.loading import load_dlm
model, tokenizer = load_dlm("tiny-diffgemma")    # no trust_remote_code: transformers' own class
```
"""


def make_config(tokenizer):
    try:
        from transformers import DiffusionGemmaConfig
    except ImportError as exc:
        import transformers

        raise SystemExit(f"build_tiny_native: transformers {transformers.__version__} has no DiffusionGemma; "
                         "install a transformers 5 release that has it (5.24 does)") from exc
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = DiffusionGemmaConfig(text_config={**TEXT, **ids}, vision_config=dict(VISION), canvas_length=CANVAS)
    config.architectures = ["DiffusionGemmaForBlockDiffusion"]
    return config


def build(out: Path = FOLDER, seed: int = SEED):
    """Write the folder (built aside in a temporary folder, then moved into place); return the model."""
    import transformers
    from transformers import AutoTokenizer

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp) / "model"
        copy_tokenizer(ZOO / "tiny_llada", tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        config = make_config(tokenizer)
        torch.manual_seed(seed)
        model = transformers.DiffusionGemmaForBlockDiffusion(config).eval()
        model.save_pretrained(tmp, safe_serialization=True)
        params = sum(p.numel() for p in model.parameters())
        (tmp / "README.md").write_text(CARD.format(seed=seed, version=transformers.__version__, params=params,
                                                   canvas=CANVAS, **TEXT))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FOLDER, help=f"folder to write (default {FOLDER})")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    build(args.out, seed=args.seed)
    print(f"wrote {args.out}")
