"""Dream configuration (remote code for the embedded `tiny-dream` twin).

Layout of Dream-org/Dream-v0-Base-7B (and Dream-Coder / DiffuCoder): a Qwen2 decoder used as a
bidirectional masked-diffusion LM.  Dream's hub config has model_type "Dream" and is loaded through
`AutoModel` (AutoModelForCausalLM rejects it); its mask id is 151666 at full size.
"""
from transformers import PretrainedConfig


class DreamConfig(PretrainedConfig):
    model_type = "Dream"

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        max_position_embeddings: int = 512,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
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
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.use_cache = use_cache
        kwargs["tie_word_embeddings"] = True  # Dream-7B unties its head; tied here to keep the toy under 2 MB
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
