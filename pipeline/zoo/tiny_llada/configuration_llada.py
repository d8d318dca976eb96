"""LLaDA configuration (remote code for the embedded `tiny-llada` / `tiny-ar` twins).

Field names follow GSAI-ML/LLaDA-8B-Base's config.json so that tools reading an 8B config (d_model,
n_heads, n_kv_heads, n_layers, mlp_hidden_size, mask_token_id, ...) read these toy checkpoints unchanged.
`causal` is the one addition: False for the diffusion model (bidirectional, as in LLaDA), True for the
autoregressive twin.
"""
from .twin_layers import TwinConfig


class LLaDAConfig(TwinConfig):
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
    field_defaults = dict(
        d_model=192, n_heads=4, n_kv_heads=2, n_layers=4, mlp_hidden_size=512, vocab_size=4096, embedding_size=4096,
        max_sequence_length=512, rope_theta=10000.0, rms_norm_eps=1e-5, activation_type="silu", block_type="llama",
        include_bias=False, weight_tying=False, causal=False, init_std=0.02,
    )

    def tied_head(self) -> bool:
        return self.weight_tying  # the source of truth; LLaDA-8B's head is untied
