"""LLaDA modelling code at toy size (remote code for the embedded `tiny-llada` / `tiny-ar` twins).

Same module names and checkpoint keys as GSAI-ML/LLaDA-8B-Base:

    model.transformer.wte                      token embedding
    model.transformer.blocks.{i}.attn_norm     RMSNorm before attention
    model.transformer.blocks.{i}.q_proj/k_proj/v_proj/attn_out
    model.transformer.blocks.{i}.ff_norm       RMSNorm before the MLP
    model.transformer.blocks.{i}.ff_proj/up_proj/ff_out   SwiGLU: ff_out(silu(ff_proj(x)) * up_proj(x))
    model.transformer.ln_f                     final RMSNorm
    model.transformer.ff_out                   untied LM head

Pre-norm, RoPE, no biases, grouped-query attention.  Attention goes through
`F.scaled_dot_product_attention`, looked up on the module at call time, so an attention probe that
monkeypatches `torch.nn.functional.scaled_dot_product_attention` sees every call with the full
(already repeated) key/value heads.  `config.causal` selects the autoregressive twin.  RMSNorm, RoPE, the
q/k/v heads and the padding mask are the twins' shared code (twin_layers.py, next to this file).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada import LLaDAConfig
from .twin_layers import RMSNorm, qkv_heads, rope, rope_frequencies, visible_keys


class RMSLayerNorm(RMSNorm):
    """LLaDA's name for the twins' RMSNorm (twin_layers.py)."""


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on the two halves of each head (GPT-NeoX layout, as in LLaDA)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(head_dim, theta), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope(q, k, self.inv_freq)


class LLaDALlamaBlock(nn.Module):
    def __init__(self, layer_id: int, config: LLaDAConfig):
        super().__init__()
        self.layer_id = layer_id
        self.config = config
        self.head_dim = config.d_model // config.n_heads
        kv_dim = config.n_kv_heads * self.head_dim
        bias = config.include_bias
        self.attn_norm = RMSLayerNorm(config.d_model, config.rms_norm_eps)
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=bias)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=bias)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=bias)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=bias)
        self.ff_norm = RMSLayerNorm(config.d_model, config.rms_norm_eps)
        self.ff_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=bias)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=bias)
        self.ff_out = nn.Linear(config.mlp_hidden_size, config.d_model, bias=bias)
        self.act = nn.SiLU()
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.rope_theta)

    def attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = qkv_heads(x, (self.q_proj, self.k_proj, self.v_proj), self.config.n_heads, self.config.n_kv_heads,
                            self.rotary_emb.inv_freq)
        is_causal = bool(self.config.causal) and attn_mask is None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal)
        return self.attn_out(out.transpose(1, 2).reshape(b, length, -1))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attn_norm(x), attn_mask)
        h = self.ff_norm(x)
        return x + self.ff_out(self.act(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    """The transformer body, under the attribute name `transformer` as in the 8B checkpoint."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.embedding_size, config.d_model),
                blocks=nn.ModuleList(LLaDALlamaBlock(i, config) for i in range(config.n_layers)),
                ln_f=RMSLayerNorm(config.d_model, config.rms_norm_eps),
            )
        )
        if not config.weight_tying:
            self.transformer.update({"ff_out": nn.Linear(config.d_model, config.embedding_size, bias=False)})

    def build_attn_mask(self, attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """[B, L] padding mask (1 = attend) -> boolean [B, 1, L, L] SDPA mask, None when nothing is masked (the
        causal twin then passes `is_causal` to SDPA)."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        return visible_keys(attention_mask, length, attention_mask.device, 1 if self.config.causal else None)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_hidden_states=False):
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        attn_mask = self.build_attn_mask(attention_mask, x.shape[1])
        hidden_states = []
        for block in self.transformer.blocks:
            if output_hidden_states:
                hidden_states.append(x)
            x = block(x, attn_mask)
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            hidden_states.append(x)
        head = self.transformer.wte.weight if self.config.weight_tying else self.transformer.ff_out.weight
        logits = F.linear(x, head)
        return logits, (tuple(hidden_states) if output_hidden_states else None)


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]

    def __init__(self, config: LLaDAConfig, model: LLaDAModel | None = None):
        super().__init__(config)
        self.model = model if model is not None else LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module: nn.Module):
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSLayerNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        logits, hidden_states = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_hidden_states=bool(output_hidden_states),
        )
        loss = None
        if labels is not None:
            if self.config.causal:  # next-token loss for the AR twin
                logits_for_loss, targets = logits[:, :-1], labels[:, 1:]
            else:  # plain per-position CE; the diffusion ELBO weighting lives in the training recipe
                logits_for_loss, targets = logits, labels
            loss = F.cross_entropy(
                logits_for_loss.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
            )
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states)
        return output if return_dict is not False else output.to_tuple()


def scaled_init_(model: LLaDAModelLM) -> None:
    """GPT-2-style depth scaling of residual output projections (used by the training recipe)."""
    std = model.config.init_std / math.sqrt(2 * model.config.n_layers)
    for block in model.model.transformer.blocks:
        nn.init.normal_(block.attn_out.weight, std=std)
        nn.init.normal_(block.ff_out.weight, std=std)
