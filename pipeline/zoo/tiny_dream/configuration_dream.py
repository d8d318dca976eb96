"""Dream configuration (remote code for the embedded `tiny-dream` twin).

Layout of Dream-org/Dream-v0-Base-7B (and Dream-Coder / DiffuCoder): a Qwen2 decoder used as a
bidirectional masked-diffusion LM.  Dream's hub config has model_type "Dream" and is loaded through
`AutoModel` (AutoModelForCausalLM rejects it); its mask id is 151666 at full size.  Dream-7B unties its head;
it is tied here to keep the toy under 2 MB.  The fields and their defaults are `field_defaults`.
"""
from .twin_layers import QWEN_FIELDS, TwinConfig


class DreamConfig(TwinConfig):
    model_type = "Dream"
    field_defaults = {**QWEN_FIELDS, "intermediate_size": 128, "rms_norm_eps": 1e-6}
