"""SDAR configuration (remote code for the embedded `tiny-sdar` twin).

Layout of JetLM/SDAR (and Fast-dLLM v2): a Qwen3 decoder (per-head q/k RMSNorm, no biases) trained for
block diffusion: a query sees every key of its own block of `block_length` tokens and every key of the
blocks before it (causal across blocks, bidirectional within one).  The LM head is tied here to keep the toy
under 2 MB.  The fields and their defaults are `field_defaults`.
"""
from .twin_layers import QWEN_FIELDS, TwinConfig


class SDARConfig(TwinConfig):
    model_type = "sdar"
    field_defaults = {**QWEN_FIELDS, "intermediate_size": 128, "rms_norm_eps": 1e-6, "block_length": 8}
