"""The embedded structural twins `tiny-llada` (bidirectional, masked diffusion) and `tiny-ar` (causal)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import math  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.model.loading import load_dlm  # noqa: E402

torch.set_num_threads(1)

ZOO = Path(__file__).resolve().parent.parent / "pipeline" / "zoo"
FOLDERS = {"tiny-llada": ZOO / "tiny_llada", "tiny-ar": ZOO / "tiny_ar"}
BLOCK_MODULES = ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out")


@pytest.fixture(scope="module", params=sorted(FOLDERS))
def twin(request):
    """(name, model, tokenizer) loaded through the hub-style remote-code path (`AutoModel`, trust_remote_code), by
    the folder's path, as `load_dlm` does it: under transformers 5 a bare `AutoModel.from_pretrained` of this
    4.x-era remote code leaves RoPE's non-persistent `inv_freq` uninitialised (load_dlm recomputes it)."""
    model, tokenizer = load_dlm(str(FOLDERS[request.param]))
    return request.param, model, tokenizer


def sample_ids(tokenizer, n_tokens=24):
    text = "Anarchism is a political philosophy that advocates self-governed societies based on voluntary institutions."
    return tokenizer(text, return_tensors="pt")["input_ids"][:, :n_tokens]


def test_config_is_llada_remote_code(twin):
    name, model, _ = twin
    config = model.config
    assert config.model_type == "llada"
    assert config.auto_map["AutoConfig"] == "configuration_llada.LLaDAConfig"
    assert config.auto_map["AutoModel"] == config.auto_map["AutoModelForCausalLM"] == "modeling_llada.LLaDAModelLM"
    assert config.n_kv_heads < config.n_heads  # GQA is exercised
    assert config.causal == (name == "tiny-ar")
    assert type(model).__name__ == "LLaDAModelLM" and model.base_model_prefix == "model"


def test_loads_through_load_dlm():
    for name in FOLDERS:
        model, tokenizer = load_dlm(name)
        assert type(model).__name__ == "LLaDAModelLM"
        assert not model.training
        assert tokenizer.mask_token_id == model.config.mask_token_id


def test_checkpoint_keys_follow_llada_8b_layout(twin):
    _, model, _ = twin
    n = model.config.n_layers
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    expected |= {f"model.transformer.blocks.{i}.{m}.weight" for i in range(n) for m in BLOCK_MODULES}
    assert set(model.state_dict()) == expected
    from safetensors import safe_open

    with safe_open(str(FOLDERS[twin[0]] / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == expected


def test_tokenizer_mask_matches_config(twin):
    _, model, tokenizer = twin
    assert tokenizer.mask_token_id == model.config.mask_token_id
    assert tokenizer.convert_ids_to_tokens(tokenizer.mask_token_id) == "<|mdm_mask|>"
    assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert sample_ids(tokenizer)[0, 0].item() == tokenizer.bos_token_id


@torch.no_grad()
def test_attention_direction(twin):
    """Changing a later token moves earlier logits in the bidirectional DLM, never in the causal twin."""
    name, model, tokenizer = twin
    ids = sample_ids(tokenizer)
    changed = ids.clone()
    changed[0, -1] = tokenizer.mask_token_id
    before, after = model(input_ids=ids).logits, model(input_ids=changed).logits
    earlier_moved = (before[0, :-1] - after[0, :-1]).abs().max().item()
    if name == "tiny-llada":
        assert earlier_moved > 1e-4
    else:
        assert earlier_moved < 1e-5


@torch.no_grad()
def test_gqa_matches_explicit_repeat_kv(twin):
    _, model, _ = twin
    block = model.model.transformer.blocks[0]
    cfg = model.config
    head_dim = cfg.d_model // cfg.n_heads
    group = cfg.n_heads // cfg.n_kv_heads
    x = torch.randn(2, 10, cfg.d_model, generator=torch.Generator().manual_seed(0))
    q = block.q_proj(x).view(2, 10, cfg.n_heads, head_dim).transpose(1, 2)
    k = block.k_proj(x).view(2, 10, cfg.n_kv_heads, head_dim).transpose(1, 2)
    v = block.v_proj(x).view(2, 10, cfg.n_kv_heads, head_dim).transpose(1, 2)
    q, k = block.rotary_emb(q, k)
    # query head h reads kv head h // group
    k = torch.stack([k[:, h // group] for h in range(cfg.n_heads)], dim=1)
    v = torch.stack([v[:, h // group] for h in range(cfg.n_heads)], dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    if cfg.causal:
        scores = scores.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, cfg.d_model)
    torch.testing.assert_close(block.attention(x, None), block.attn_out(out), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_padding_mask_hides_padded_keys(twin):
    _, model, tokenizer = twin
    ids = sample_ids(tokenizer, 12)
    padded = torch.cat([ids, torch.full((1, 4), tokenizer.pad_token_id)], dim=1)
    attention_mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    reference = model(input_ids=ids).logits
    with_padding = model(input_ids=padded, attention_mask=attention_mask).logits[:, :12]
    torch.testing.assert_close(with_padding, reference, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_sdpa_is_looked_up_at_call_time(twin):
    """A probe that monkeypatches torch.nn.functional.scaled_dot_product_attention sees every layer."""
    _, model, tokenizer = twin
    original, calls = torch.nn.functional.scaled_dot_product_attention, []

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape, k.shape))
        return original(q, k, v, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        model(input_ids=sample_ids(tokenizer))
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert len(calls) == model.config.n_layers
    assert all(q[1] == k[1] == model.config.n_heads for q, k in calls)  # kv heads repeated before the call


@torch.no_grad()
def test_trained_llada_beats_random_init_on_heldout_elbo():
    from pipeline.zoo import train_tiny, training

    trained, tokenizer = load_dlm(str(FOLDERS["tiny-llada"]))
    random_init = train_tiny.new_model(trained.config, seed=1).eval()
    stream = training.token_stream(tokenizer, "heldout")
    ids = (trained.config.mask_token_id, trained.config.bos_token_id)
    elbo = lambda m: train_tiny.heldout_elbo(m, stream, *ids, seqlen=64, n_windows=8, n_t=4)  # noqa: E731
    trained_elbo, random_elbo = elbo(trained), elbo(random_init)
    assert trained_elbo < random_elbo - 1.0, (trained_elbo, random_elbo)


@torch.no_grad()
def test_save_pretrained_round_trip(twin, tmp_path):
    name, model, tokenizer = twin
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    for code in ("configuration_llada.py", "modeling_llada.py"):
        if not (tmp_path / code).exists():
            shutil.copyfile(FOLDERS[name] / code, tmp_path / code)
    reloaded, _ = load_dlm(str(tmp_path))
    ids = sample_ids(tokenizer)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert reloaded.config.mask_token_id == model.config.mask_token_id
    assert reloaded.config.causal == model.config.causal
