"""Loading a diffusion LM and its tokenizer: hub ids, local folders and the embedded zoo.

    model, tokenizer = load_dlm("GSAI-ML/LLaDA-8B-Base", trust_remote_code=True)
    model, tokenizer = load_dlm("minilm-dlm")           # embedded default, offline

The model class follows the checkpoint: remote code with an `auto_map` goes through `AutoModel` (LLaDA and
Dream register their LM class there; `AutoModelForCausalLM` rejects Dream's config), a native
architecture named in `config.architectures` is built with that class, anything else with `AutoModel`.
"""
from __future__ import annotations

from pathlib import Path

import torch

ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo"
ZOO_FOLDERS = ("tiny-llada", "tiny-ar", "tiny-llada-moe", "tiny-dream", "tiny-sdar")  # remote-code folders in pipeline/zoo
EMBEDDED = ("minilm-dlm", "minilm-dlm-rel", "minilm-ar", *ZOO_FOLDERS)
# Fallback mask ids by model_type, for checkpoints whose tokenizer and config do not name one.
KNOWN_MASK_IDS = {"llada": 126336, "dream": 151666}


def resolve_path(pretrained: str) -> str:
    """Embedded names map to folders of this repo (or the cache); local paths must exist; else a hub id."""
    if pretrained in ("minilm-dlm", "minilm-dlm-rel", "minilm-ar"):
        from pipeline.zoo import minilm_dlm

        return str(minilm_dlm.materialize(pretrained))
    if pretrained in ZOO_FOLDERS:
        return str(ZOO_DIR / pretrained.replace("-", "_"))
    looks_local = pretrained.startswith((".", "/", "~")) or Path(pretrained).expanduser().exists()
    if looks_local:
        path = Path(pretrained).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model path {pretrained!r} has no config.json: give a Hugging Face checkpoint folder, "
                f"a hub id, or one of the embedded models {', '.join(EMBEDDED)}"
            )
        return str(path)
    return pretrained


def _model_class(config, model_class: str):
    import transformers

    if model_class != "auto":
        return getattr(transformers, model_class)
    auto_map = getattr(config, "auto_map", None) or {}
    if "AutoModel" in auto_map:
        return transformers.AutoModel
    for arch in getattr(config, "architectures", None) or []:
        if hasattr(transformers, arch):
            return getattr(transformers, arch)
    return transformers.AutoModel


def load_dlm(
    pretrained: str,
    *,
    trust_remote_code: bool = True,
    torch_dtype: str | torch.dtype | None = None,
    model_class: str = "auto",
    attn_implementation: str | None = "sdpa",
    device_map=None,
):
    """Return (model in eval mode, tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_path(pretrained)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = _model_class(config, model_class)
    kwargs = {"trust_remote_code": trust_remote_code, "config": config}
    if isinstance(torch_dtype, str) and torch_dtype != "auto":
        torch_dtype = getattr(torch, torch_dtype)
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation and not getattr(config, "auto_map", None):
        kwargs["attn_implementation"] = attn_implementation  # remote code picks its own attention
    model = cls.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer


def resolve_mask_token_id(tokenizer, config, explicit: int | None = None) -> int:
    """The mask id: an explicit value wins, then the tokenizer's, then the config's, then a known id."""
    if explicit is not None:
        return int(explicit)
    tok_id = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
    if tok_id is not None:
        return int(tok_id)
    cfg_id = getattr(config, "mask_token_id", None)
    if cfg_id is not None:
        return int(cfg_id)
    model_type = getattr(config, "model_type", None)
    vocab = getattr(config, "vocab_size", None) or getattr(config, "embedding_size", None)
    if model_type in KNOWN_MASK_IDS and (vocab is None or KNOWN_MASK_IDS[model_type] < vocab):
        return KNOWN_MASK_IDS[model_type]
    raise ValueError(
        f"no mask token: the tokenizer has no mask_token and config (model_type={model_type!r}) has no "
        "mask_token_id; set model.init_args.mask_token_id (LLaDA: 126336, Dream: 151666)"
    )
