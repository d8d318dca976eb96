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
The layers are the twins' shared ones (twin_layers.py, next to this file).
"""
from __future__ import annotations

from .configuration_dream import DreamConfig
from .twin_layers import DecoderLayer, TwinForDiffusionLM, TwinModel


class DreamDecoderLayer(DecoderLayer):
    attention_options = dict(qkv_bias=True)


class DreamBaseModel(TwinModel):
    layer_class = DreamDecoderLayer


class DreamModel(TwinForDiffusionLM):
    config_class = DreamConfig
    body_class = DreamBaseModel
    _no_split_modules = ["DreamDecoderLayer"]
