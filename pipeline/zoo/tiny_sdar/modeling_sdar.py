"""SDAR modelling code at toy size (remote code for the embedded `tiny-sdar` twin).

Module names (Qwen3, as in JetLM/SDAR-*):

    model.embed_tokens                                   token embedding (the LM head is tied to it here)
    model.layers.{i}.input_layernorm                     RMSNorm
    model.layers.{i}.self_attn.q_proj/k_proj/v_proj/o_proj   no biases, GQA k/v
    model.layers.{i}.self_attn.q_norm/k_norm             per-head RMSNorm (Qwen3)
    model.layers.{i}.post_attention_layernorm            RMSNorm
    model.layers.{i}.mlp.gate_proj/up_proj/down_proj     SwiGLU
    model.norm                                           final RMSNorm

Block-diffusion attention through `F.scaled_dot_product_attention`, looked up at call time (so an attention
probe that patches it sees every layer), with a boolean [B|1, 1, L, L] mask (True = attend): query i sees key
j iff j // block_length <= i // block_length, and j is not padding.  The layers are the twins' shared ones
(twin_layers.py, next to this file).
"""
from __future__ import annotations

import torch

from .configuration_sdar import SDARConfig
from .twin_layers import DecoderLayer, TwinForDiffusionLM, TwinModel, visible_keys


class SDARDecoderLayer(DecoderLayer):
    attention_options = dict(qk_norm=True)


class SDARBaseModel(TwinModel):
    layer_class = SDARDecoderLayer

    def attn_mask(self, attention_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Boolean [B|1, 1, L, L] block-causal mask (True = attend), padding keys blocked."""
        return visible_keys(attention_mask, x.shape[1], x.device, self.config.block_length)


class SDARForCausalLM(TwinForDiffusionLM):
    config_class = SDARConfig
    body_class = SDARBaseModel
    _no_split_modules = ["SDARDecoderLayer"]
