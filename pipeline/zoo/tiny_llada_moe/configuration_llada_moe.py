"""LLaDA-MoE configuration (remote code for the embedded `tiny-llada-moe` twin).

Layout of inclusionAI's LLaDA-MoE-7B-A1B / LLaDA2 at toy size: every block has a top-k router over
`num_experts` small SwiGLU experts.  `block_causal` switches on LLaDA2's block-diffusion attention (a
query sees every key of its own block of `block_length` tokens and of the blocks before it), given to
SDPA as an additive [B, 1, L, L] mask.
"""
from transformers import PretrainedConfig


class LLaDAMoEConfig(PretrainedConfig):
    model_type = "llada_moe"

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        expert_intermediate_size: int = 32,
        norm_topk_prob: bool = True,
        max_position_embeddings: int = 512,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        block_causal: bool = False,
        block_length: int = 32,
        initializer_range: float = 0.02,
        mask_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.expert_intermediate_size = expert_intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.block_causal = block_causal
        self.block_length = block_length
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.use_cache = use_cache
        kwargs["tie_word_embeddings"] = True  # the LM head reads the embedding matrix (keeps the toy small)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
