"""Dream modelling code at toy size (remote code for the embedded `tiny-dream` twin).

Module names (Qwen2, as in Dream-v0-Base-7B):

    model.embed_tokens                                   token embedding (the LM head is tied to it here)
    model.layers.{i}.input_layernorm                     RMSNorm
    model.layers.{i}.self_attn.q_proj/k_proj/v_proj      with biases (Qwen2), GQA k/v
    model.layers.{i}.self_attn.o_proj                    no bias
    model.layers.{i}.post_attention_layernorm            RMSNorm
    model.layers.{i}.mlp.gate_proj/up_proj/down_proj     SwiGLU
    model.norm                                           final RMSNorm

Bidirectional attention through `F.scaled_dot_product_attention`, looked up at call time (so an attention
probe that patches it sees every layer); a padding `attention_mask` becomes a boolean [B, 1, L, L] mask.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_dream import DreamConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the two halves of each head (Qwen2 layout). t: [B, H, L, hd], cos/sin: [L, hd]."""
    t1, t2 = t.float().chunk(2, dim=-1)
    return (t.float() * cos + torch.cat((-t2, t1), dim=-1) * sin).to(t.dtype)


class Attention(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        d, self.n_heads, self.n_kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = d // self.n_heads
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(d, d, bias=False)
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.n_heads, self.head_dim).transpose(1, 2)   # [B, H, L, hd]
        k = self.k_proj(x).view(b, length, self.n_kv, self.head_dim).transpose(1, 2)      # [B, Hkv, L, hd]
        v = self.v_proj(x).view(b, length, self.n_kv, self.head_dim).transpose(1, 2)
        freqs = torch.outer(torch.arange(length, device=x.device, dtype=torch.float32), self.inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)                                         # [L, hd]
        q, k = rotate(q, angles.cos(), angles.sin()), rotate(k, angles.cos(), angles.sin())
        k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0)  # [B, H, L, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


class MLP(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamBaseModel(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @staticmethod
    def attn_mask(attention_mask: torch.Tensor | None, length: int, device) -> torch.Tensor | None:
        """Boolean [B, 1, L, L] (True = attend) for padded batches, None when every key is visible."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        allowed = attention_mask.to(torch.bool)[:, None, None, :].expand(-1, 1, length, length)
        return allowed | torch.eye(length, dtype=torch.bool, device=device)  # no fully blocked query row

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_hidden_states=False):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds   # [B, L, d]
        mask = self.attn_mask(attention_mask, x.shape[1], x.device)
        hidden = []
        for layer in self.layers:
            hidden.append(x)
            x = layer(x, mask)
        x = self.norm(x)
        hidden.append(x)
        return F.linear(x, self.embed_tokens.weight), (tuple(hidden) if output_hidden_states else None)


class DreamModel(PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
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
