"""LLaDA-MoE modelling code at toy size (remote code for the embedded `tiny-llada-moe` twin).

Module names (OLMoE-style, as in LLaDA-MoE-7B-A1B):

    model.embed_tokens                                   token embedding, also the LM head (tied)
    model.layers.{i}.input_layernorm                     RMSNorm before attention
    model.layers.{i}.self_attn.q_proj/k_proj/v_proj/o_proj
    model.layers.{i}.post_attention_layernorm            RMSNorm before the MoE
    model.layers.{i}.mlp.gate                            router: Linear(d, num_experts)
    model.layers.{i}.mlp.experts.{j}.gate_proj/up_proj/down_proj   SwiGLU experts
    model.norm                                           final RMSNorm

Bidirectional attention (or LLaDA2's block-causal one, `config.block_causal`) through
`F.scaled_dot_product_attention`, looked up at call time so an attention probe that patches it sees every
layer.  Routing: softmax over experts, top-k (selection on probs + `expert_bias`, as in aux-loss-free
balancing), the chosen probabilities renormalised.  Each expert sees only its routed tokens as a 2-D
[n_routed, d] tensor; while it runs, `expert.routed_tokens` holds their flat indices into the [B·L] batch,
ascending (the calibration callbacks read it to weight each row by its own token's weight).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada_moe import LLaDAMoEConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the two halves of each head (GPT-NeoX layout). t: [B, H, L, hd], cos/sin: [L, hd]."""
    t1, t2 = t.float().chunk(2, dim=-1)
    return (t.float() * cos + torch.cat((-t2, t1), dim=-1) * sin).to(t.dtype)


class Attention(nn.Module):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        d, self.n_heads, self.n_kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = d // self.n_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
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
        k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)  # probes see one key head per query head
        v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0)  # [B, H, L, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


class Expert(nn.Module):
    """SwiGLU MLP on the [n_routed, d] rows routed to it; `routed_tokens` is set by the router while it runs."""

    routed_tokens: torch.Tensor | None = None

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(config.hidden_size, config.expert_intermediate_size) for _ in range(config.num_experts))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))  # selection only, never the weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        flat = x.reshape(-1, d)                                              # [N, d], N = B·L
        probs = self.gate(flat).float().softmax(dim=-1)                      # [N, E]
        chosen = (probs + self.expert_bias).topk(self.top_k, dim=-1).indices  # [N, k]
        weights = probs.gather(-1, chosen)                                   # [N, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)              # [n_e] each, tokens ascending
            if token.numel() == 0:
                continue
            expert.routed_tokens = token
            try:
                y = expert(flat[token])                                      # [n_e, d]
            finally:
                expert.routed_tokens = None
            out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
        return out.view(b, length, d)


class LLaDAMoEDecoderLayer(nn.Module):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoE(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDAMoEModel(nn.Module):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LLaDAMoEDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def attn_mask(self, attention_mask: torch.Tensor | None, length: int, dtype, device) -> torch.Tensor | None:
        """Additive [B|1, 1, L, L] SDPA mask (0 = attend, dtype min = blocked), None when nothing is blocked."""
        allowed = torch.ones(length, length, dtype=torch.bool, device=device)
        if self.config.block_causal:
            block = torch.arange(length, device=device) // self.config.block_length
            allowed = block[:, None] >= block[None, :]                        # own block and earlier ones
        allowed = allowed[None, None]                                         # [1, 1, L, L]
        if attention_mask is not None and not bool(attention_mask.all()):
            allowed = allowed & attention_mask.to(torch.bool)[:, None, None, :]
        elif not self.config.block_causal:
            return None
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=device)  # no fully blocked query row
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_hidden_states=False):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds   # [B, L, d]
        mask = self.attn_mask(attention_mask, x.shape[1], x.dtype, x.device)
        hidden = []
        for layer in self.layers:
            hidden.append(x)
            x = layer(x, mask)
        x = self.norm(x)
        hidden.append(x)
        return F.linear(x, self.embed_tokens.weight), (tuple(hidden) if output_hidden_states else None)


class LLaDAMoEModelLM(PreTrainedModel):
    config_class = LLaDAMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDAMoEDecoderLayer"]

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        self.model = LLaDAMoEModel(config)
        self.post_init()

    def _init_weights(self, module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
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
        if labels is not None:  # plain per-position CE; the diffusion ELBO weighting lives in the recipe
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden)
        return output if return_dict is not False else output.to_tuple()
