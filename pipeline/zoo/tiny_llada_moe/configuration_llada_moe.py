"""LLaDA-MoE configuration (remote code for the embedded `tiny-llada-moe` twin).

Layout of inclusionAI's LLaDA-MoE-7B-A1B / LLaDA2 at toy size: every block has a top-k router over
`num_experts` small SwiGLU experts (hidden `expert_intermediate_size`), the top-k probabilities renormalised
when `norm_topk_prob`.  `block_causal` switches on LLaDA2's block-diffusion attention (a query sees every key
of its own block of `block_length` tokens and of the blocks before it), given to SDPA as an additive
[B, 1, L, L] mask.  The LM head reads the embedding matrix (tied).  The fields and their defaults are
`field_defaults`.
"""
from .twin_layers import QWEN_FIELDS, TwinConfig


class LLaDAMoEConfig(TwinConfig):
    model_type = "llada_moe"
    field_defaults = {**QWEN_FIELDS, "num_experts": 8, "num_experts_per_tok": 2, "expert_intermediate_size": 32,
                      "norm_topk_prob": True, "block_causal": False, "block_length": 32}
