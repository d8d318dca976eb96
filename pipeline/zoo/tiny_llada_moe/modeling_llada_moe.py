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
ascending (the calibration callbacks read it to weight each row by its own token's weight).  Attention, norms
and the model around the MoE are the twins' shared layers (twin_layers.py, next to this file).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .configuration_llada_moe import LLaDAMoEConfig
from .twin_layers import MLP, DecoderLayer, TwinForDiffusionLM, TwinModel, visible_keys


class Expert(MLP):
    """SwiGLU MLP on the [n_routed, d] rows routed to it; `routed_tokens` is set by the router while it runs."""

    routed_tokens: torch.Tensor | None = None


class SparseMoE(nn.Module):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(config, config.expert_intermediate_size) for _ in range(config.num_experts))
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


class LLaDAMoEDecoderLayer(DecoderLayer):
    mlp_class = SparseMoE


class LLaDAMoEModel(TwinModel):
    layer_class = LLaDAMoEDecoderLayer

    def attn_mask(self, attention_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """Additive [B|1, 1, L, L] SDPA mask (0 = attend, dtype min = blocked), None when nothing is blocked."""
        block_length = self.config.block_length if self.config.block_causal else None
        allowed = visible_keys(attention_mask, x.shape[1], x.device, block_length)
        if allowed is None:
            return None
        blocked = torch.finfo(x.dtype).min
        return torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, blocked)


class LLaDAMoEModelLM(TwinForDiffusionLM):
    config_class = LLaDAMoEConfig
    body_class = LLaDAMoEModel
    _no_split_modules = ["LLaDAMoEDecoderLayer"]
