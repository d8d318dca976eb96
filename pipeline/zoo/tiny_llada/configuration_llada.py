"""LLaDA configuration (remote code for the embedded `tiny-llada` / `tiny-ar` twins).

Field names follow GSAI-ML/LLaDA-8B-Base's config.json so that tools reading an 8B config (d_model,
n_heads, n_kv_heads, n_layers, mlp_hidden_size, mask_token_id, ...) read these toy checkpoints unchanged.
`causal` is the one addition: False for the diffusion model (bidirectional, as in LLaDA), True for the
autoregressive twin.
"""
from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Generic names that transformers utilities and probes look up, mapped onto LLaDA's own.
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
    }

    def __init__(
        self,
        d_model: int = 192,
        n_heads: int = 4,
        n_kv_heads: int = 2,
        n_layers: int = 4,
        mlp_hidden_size: int = 512,
        vocab_size: int = 4096,
        embedding_size: int = 4096,
        max_sequence_length: int = 512,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        activation_type: str = "silu",
        block_type: str = "llama",
        include_bias: bool = False,
        weight_tying: bool = False,
        causal: bool = False,
        init_std: float = 0.02,
        mask_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = False,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.activation_type = activation_type
        self.block_type = block_type
        self.include_bias = include_bias
        self.weight_tying = weight_tying
        self.causal = causal
        self.init_std = init_std
        self.mask_token_id = mask_token_id
        self.use_cache = use_cache
        kwargs.pop("tie_word_embeddings", None)  # saved configs carry it; weight_tying is the source of truth
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=weight_tying,
            **kwargs,
        )
