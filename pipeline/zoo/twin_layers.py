"""The layers the tiny remote-code twins share (tiny-dream, tiny-sdar, tiny-llada-moe; tiny-llada / tiny-ar in part).

One copy lives here, in pipeline/zoo/; each twin folder holds a symlink to it and imports it relatively
(`from .twin_layers import ...`), so that transformers copies it next to the twin's own files when it loads the
folder with `trust_remote_code`, and again when a pruned twin is saved (`custom_object_save` follows relative
imports).  Only torch and transformers are imported here.

    TwinConfig           fields declared once per twin (`field_defaults`), special-token ids, tied head, auto_map
    RMSNorm              float32 RMS normalisation, weight applied in the input's dtype
    rope_frequencies     RoPE inverse frequencies (a non-persistent buffer in each attention)
    rope                 RoPE on the two halves of each head (GPT-NeoX / Qwen layout)
    qkv_heads            q/k/v projections → [B, H, L, hd] heads, optional per-head q/k norm, RoPE, kv heads repeated
    visible_keys         boolean [B|1, 1, L, L] mask (True = attend): padding, optionally block-causal
    Attention, MLP, DecoderLayer, TwinModel, TwinForDiffusionLM
                         the Qwen2 / Qwen3 / OLMoE module layout (`model.layers.{i}.self_attn.q_proj`, ...)

Attention goes through `F.scaled_dot_product_attention`, looked up at call time, so an attention probe that
patches it sees every layer with the kv heads already repeated.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# The fields tiny-dream, tiny-sdar and tiny-llada-moe have in common (Qwen names), with their defaults.
QWEN_FIELDS = dict(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5, initializer_range=0.02)


class TwinConfig(PretrainedConfig):
    """A twin's own fields are `field_defaults` (name -> default), each set from the keyword of that name; the mask
    id and `use_cache` are common to all, and the LM head is tied to the embedding unless `tied_head()` says not."""

    field_defaults = {}  # no annotation: transformers 5 makes every config class a dataclass

    def __init_subclass__(cls, **kwargs):
        # transformers 5 gives a config class without an `__init__` of its own a dataclass `__init__` (which would
        # skip `field_defaults`): each twin's config class gets this one, as if it had written it.
        if "__init__" not in cls.__dict__:
            cls.__init__ = TwinConfig.__init__
        super().__init_subclass__(**kwargs)

    def __init__(self, mask_token_id=None, bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False,
                 **kwargs):
        for name, default in self.field_defaults.items():
            setattr(self, name, kwargs.pop(name, default))
        self.mask_token_id = mask_token_id
        self.use_cache = use_cache
        kwargs["tie_word_embeddings"] = self.tied_head()  # saved configs carry it; the twin decides
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    def tied_head(self) -> bool:
        return True  # the LM head reads the embedding matrix (keeps the toys small)

    @classmethod
    def for_tokenizer(cls, tokenizer, model_class: type, auto_models=("AutoModel", "AutoModelForCausalLM"), **fields):
        """The builders' config: `tokenizer`'s vocabulary size and special ids, `architectures` and an `auto_map` that
        names this config's and `model_class`'s files (remote code), for each of `auto_models`."""
        config = cls(**fields, vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)

        def where(c: type) -> str:
            return f"{c.__module__.rpartition('.')[2]}.{c.__name__}"

        config.architectures = [model_class.__name__]
        config.auto_map = {"AutoConfig": where(cls), **{auto: where(model_class) for auto in auto_models}}
        return config


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """[hd / 2] float32 inverse frequencies."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    t1, t2 = t.float().chunk(2, dim=-1)
    return (t.float() * cos + torch.cat((-t2, t1), dim=-1) * sin).to(t.dtype)


def rope(q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on the two halves of each head, in float32. q: [B, H, L, hd], k: [B, Hkv, L, hd]."""
    positions = torch.arange(q.shape[-2], device=q.device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.to(q.device))
    angles = torch.cat((freqs, freqs), dim=-1)                                          # [L, hd]
    cos, sin = angles.cos(), angles.sin()
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def qkv_heads(x: torch.Tensor, projections, n_heads: int, n_kv: int, inv_freq: torch.Tensor, qk_norms=None):
    """x: [B, L, d] -> q, k, v: [B, H, L, hd] each.  `projections` = (q_proj, k_proj, v_proj); `qk_norms` = (q_norm,
    k_norm) applied per head before RoPE (Qwen3), or None.  The kv heads are repeated before SDPA (as LLaDA does)
    so that an attention probe sees one key head per query head."""
    b, length, _ = x.shape
    head_dim = x.shape[-1] // n_heads
    q, k, v = (proj(x).view(b, length, -1, head_dim) for proj in projections)         # [B, L, H|Hkv, hd]
    if qk_norms is not None:
        q, k = qk_norms[0](q), qk_norms[1](k)
    q, k = rope(q.transpose(1, 2), k.transpose(1, 2), inv_freq)
    v = v.transpose(1, 2)
    if n_kv != n_heads:
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
    return q, k, v


def visible_keys(attention_mask: torch.Tensor | None, length: int, device, block_length: int | None = None):
    """Boolean [B|1, 1, L, L] SDPA mask (True = attend), None when every key is visible.  `block_length`: block-causal
    (a query sees its own block and the blocks before it; 1 is causal).  Padding keys ([B, L] mask, 0 = pad) are
    hidden, and each query still sees itself (no fully blocked row)."""
    allowed = None
    if block_length:
        block = torch.arange(length, device=device) // block_length
        allowed = (block[:, None] >= block[None, :])[None, None]                       # own block and earlier ones
    if attention_mask is not None and not bool(attention_mask.all()):
        keys = attention_mask.to(torch.bool)[:, None, None, :]
        allowed = keys.expand(-1, 1, length, length) if allowed is None else allowed & keys
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=device)
    return allowed


class Attention(nn.Module):
    """GQA self-attention with RoPE: q/k/v/o_proj, biases on q/k/v (`qkv_bias`, Qwen2), per-head q/k RMSNorm
    (`qk_norm`, Qwen3)."""

    def __init__(self, config, qkv_bias: bool = False, qk_norm: bool = False):
        super().__init__()
        d, self.n_heads, self.n_kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = d // self.n_heads
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(d, d, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.register_buffer("inv_freq", rope_frequencies(self.head_dim, config.rope_theta), persistent=False)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        norms = (self.q_norm, self.k_norm) if hasattr(self, "q_norm") else None
        q, k, v = qkv_heads(x, (self.q_proj, self.k_proj, self.v_proj), self.n_heads, self.n_kv, self.inv_freq, norms)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0)  # [B, H, L, hd]
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)), hidden `intermediate_size` unless given."""

    def __init__(self, config, hidden: int | None = None):
        super().__init__()
        d, hidden = config.hidden_size, hidden or config.intermediate_size
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + self_attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x)).  A twin names
    its own subclass (`_no_split_modules`) and sets `attention_options` and `mlp_class`."""

    attention_options: dict = {}
    mlp_class = MLP

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, **self.attention_options)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = self.mlp_class(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TwinModel(nn.Module):
    """embed_tokens -> layers (`layer_class`) -> norm; logits from the tied embedding.  `attn_mask` is the twin's."""

    layer_class = DecoderLayer

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def attn_mask(self, attention_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """Bidirectional: a boolean mask for padded batches only."""
        return visible_keys(attention_mask, x.shape[1], x.device)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_hidden_states=False):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds   # [B, L, d]
        mask = self.attn_mask(attention_mask, x)
        hidden = []
        for layer in self.layers:
            hidden.append(x)
            x = layer(x, mask)
        x = self.norm(x)
        hidden.append(x)
        return F.linear(x, self.embed_tokens.weight), (tuple(hidden) if output_hidden_states else None)


class TwinForDiffusionLM(PreTrainedModel):
    """`model` (a `body_class`) with the LM head tied to its embedding; plain per-position cross-entropy when given
    labels (the diffusion ELBO weighting lives in the recipe)."""

    base_model_prefix = "model"
    body_class = TwinModel

    def __init__(self, config):
        super().__init__(config)
        self.model = self.body_class(config)
        self.post_init()

    def _init_weights(self, module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.normal_(module.bias, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return None  # the head is F.linear with the embedding matrix

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        logits, hidden = self.model(input_ids, attention_mask, inputs_embeds, bool(output_hidden_states))  # [B, L, V]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden)
        return output if return_dict is not False else output.to_tuple()
