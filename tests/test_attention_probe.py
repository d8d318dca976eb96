"""AttentionMassProbe: equals an explicit full softmax, never changes a model's outputs, always unpatches."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.maths.attention import AttentionMassProbe, NoAttentionSeenError, attention_mass
from tests.oracles import naive_attention_mass, probed_forward

B, H, L, D = 2, 4, 19, 8


def _qk(heads_q=H, heads_kv=H, q_len=L, k_len=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, heads_q, q_len, D, generator=g) * 2, torch.randn(B, heads_kv, k_len, D, generator=g) * 2,
            torch.randn(B, heads_kv, k_len, D, generator=g))


def _probe_mass(q, k, v, **sdpa_kwargs):
    """Mass seen by the probe around a real SDPA call (exercises argument binding as well)."""
    with AttentionMassProbe(chunk_size=5) as probe:
        F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)
    return probe.mass


def _padding(lengths, k_len=L):
    return torch.arange(k_len)[None, :] < torch.tensor(lengths)[:, None]  # [B, S] True = real token


@pytest.mark.parametrize("is_causal", [False, True])
def test_bidirectional_and_causal_match_naive(is_causal):
    q, k, v = _qk()
    expected = naive_attention_mass(q, k, is_causal=is_causal)
    torch.testing.assert_close(_probe_mass(q, k, v, is_causal=is_causal), expected, atol=1e-5, rtol=0)
    assert expected.sum().item() == pytest.approx(B * H * L, rel=1e-6)  # every query row sums to 1


def test_causal_with_fewer_queries_is_top_left_aligned_like_sdpa():
    q, k, v = _qk(q_len=5, k_len=L)
    torch.testing.assert_close(_probe_mass(q, k, v, is_causal=True), naive_attention_mass(q, k, is_causal=True), atol=1e-5, rtol=0)


def test_padding_bool_and_additive_masks_match_naive_and_each_other():
    q, k, v = _qk()
    keep = _padding([L, 11])
    bool_mask = keep[:, None, None, :]  # [B, 1, 1, S] broadcast over heads and queries
    additive = torch.zeros(B, 1, 1, L).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    from_bool = _probe_mass(q, k, v, attn_mask=bool_mask)
    torch.testing.assert_close(from_bool, naive_attention_mass(q, k, attn_mask=bool_mask), atol=1e-5, rtol=0)
    torch.testing.assert_close(_probe_mass(q, k, v, attn_mask=additive), naive_attention_mass(q, k, attn_mask=additive), atol=1e-5, rtol=0)
    torch.testing.assert_close(_probe_mass(q, k, v, attn_mask=additive), from_bool, atol=1e-5, rtol=0)
    assert from_bool[1, 11:].abs().max() == 0  # padded keys receive nothing


def test_full_per_query_mask_and_custom_scale():
    q, k, v = _qk()
    mask = torch.rand(L, L, generator=torch.Generator().manual_seed(3)) > 0.4  # [L, S], broadcast from the right
    mask[:, 0] = True  # keep every row non-empty so SDPA's own output is defined
    got = _probe_mass(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(got, naive_attention_mass(q, k, attn_mask=mask, scale=0.3), atol=1e-5, rtol=0)


def test_gqa_enable_gqa_and_repeated_heads():
    q, k, v = _qk(heads_q=8, heads_kv=2)
    expected = naive_attention_mass(q, k)
    torch.testing.assert_close(_probe_mass(q, k, v, enable_gqa=True), expected, atol=1e-5, rtol=0)
    k_rep, v_rep = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
    torch.testing.assert_close(_probe_mass(q, k_rep, v_rep), expected, atol=1e-5, rtol=0)
    causal_masked = _probe_mass(q, k, v, enable_gqa=True, is_causal=True)
    torch.testing.assert_close(causal_masked, naive_attention_mass(q, k, is_causal=True), atol=1e-5, rtol=0)


def test_query_weights_leave_padding_queries_out():
    q, k, v = _qk()
    weights = _padding([L, 7]).float()
    with AttentionMassProbe(query_weights=weights, chunk_size=4) as probe:
        F.scaled_dot_product_attention(q, k, v)
    expected = torch.stack([naive_attention_mass(q[b:b + 1, :, : int(weights[b].sum())], k[b:b + 1])[0] for b in range(B)])
    torch.testing.assert_close(probe.mass, expected, atol=1e-5, rtol=0)


def test_chunking_does_not_change_the_result():
    q, k, _ = _qk()
    full = attention_mass(q, k, chunk_size=L)
    for rows in (1, 3, 7):
        torch.testing.assert_close(attention_mass(q, k, chunk_size=rows), full, atol=1e-5, rtol=0)  # summation order only


def test_accumulates_over_calls_per_layer_and_reset():
    q, k, v = _qk()
    with AttentionMassProbe(per_layer=True) as probe:
        for _ in range(3):
            F.scaled_dot_product_attention(q, k, v)
        assert probe.calls == 3 and len(probe.per_layer) == 3
        torch.testing.assert_close(probe.mass, 3 * probe.per_layer[0])
        probe.reset()
        assert probe.calls == 0 and probe.mass is None and probe.per_layer == []
        F.scaled_dot_product_attention(q, k[:, :, :5], v[:, :, :5])  # new pass, new key length: fine after reset
        assert probe.mass.shape == (B, 5)


class TinyGQA(nn.Module):
    """Two attention layers with 4 query heads and 2 key/value heads, calling F.sdpa with enable_gqa."""

    def __init__(self, dim=16, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(dim, dim), "kv": nn.Linear(dim, 2 * kv_heads * self.head_dim), "o": nn.Linear(dim, dim)})
            for _ in range(2)
        )

    def forward(self, x, causal=True):
        b, t, _ = x.shape
        for blk in self.blocks:
            q = blk["q"](x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k, v = blk["kv"](x).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            x = x + blk["o"](a.transpose(1, 2).reshape(b, t, -1))
        return x


def test_own_gqa_module_outputs_bitwise_identical():
    torch.manual_seed(0)
    model, x = TinyGQA(), torch.randn(2, 9, 16)
    with torch.no_grad():
        plain = model(x)
        out, probe = probed_forward(model, x)
    assert torch.equal(plain, out)
    assert probe.calls == 2
    # causal: key 0 is seen by every query of every head in both layers
    assert probe.mass.sum().item() == pytest.approx(2 * 4 * 9 * 2, rel=1e-5)


def test_real_model_outputs_bitwise_identical_and_mass_plausible(minilm):
    model, tokenizer = minilm
    batch = tokenizer(["The cat sat on the [MASK].", "Paris is the capital of [MASK] and a large city."],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model(**batch).logits
        with AttentionMassProbe(per_layer=True, query_weights=batch["attention_mask"]) as probe:
            probed = model(**batch).logits
    assert torch.equal(plain, probed)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert probe.calls == layers and len(probe.per_layer) == layers
    real = batch["attention_mask"].sum(dim=1).float()
    torch.testing.assert_close(probe.mass.sum(dim=1), layers * heads * real, rtol=1e-5, atol=1e-3)
    assert probe.mass[0, int(real[0]):].max() < 1e-3  # padding keys are masked by BERT's additive mask


def test_patch_restored_after_exception_and_on_normal_exit():
    original = F.scaled_dot_product_attention
    with pytest.raises(KeyError):
        with AttentionMassProbe():
            assert F.scaled_dot_product_attention is not original
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is original
    with AttentionMassProbe():
        pass
    assert F.scaled_dot_product_attention is original


def test_nesting_both_probes_see_every_call_and_reentry_is_refused():
    original = F.scaled_dot_product_attention
    q, k, v = _qk()
    with AttentionMassProbe() as outer:
        F.scaled_dot_product_attention(q, k, v)
        with AttentionMassProbe() as inner:
            F.scaled_dot_product_attention(q, k, v)
        with pytest.raises(RuntimeError, match="already active"):
            with outer:
                pass
    assert F.scaled_dot_product_attention is original
    assert outer.calls == 2 and inner.calls == 1
    torch.testing.assert_close(outer.mass, 2 * inner.mass)


def test_zero_attention_calls_is_a_clear_error():
    with AttentionMassProbe() as probe:
        nn.Linear(4, 4)(torch.randn(2, 4))
    with pytest.raises(NoAttentionSeenError, match="scaled_dot_product_attention.*attn_implementation='sdpa'"):
        probe.require_attention()
    with pytest.raises(NoAttentionSeenError, match="Linear"):
        probed_forward(nn.Linear(4, 4), torch.randn(2, 4))


def _tiny_llama(attn_implementation):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


def test_native_model_through_attention_interface_matches_eager_attentions():
    """transformers' ALL_ATTENTION_FUNCTIONS["sdpa"] ends in F.sdpa (GQA, causal): probed, outputs unchanged,
    and the mass equals the eager model's output_attentions summed over heads and queries."""
    sdpa, eager = _tiny_llama("sdpa"), _tiny_llama("eager")
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = sdpa(input_ids=ids).logits
        out, probe = probed_forward(sdpa, input_ids=ids, per_layer=True)
        attentions = eager(input_ids=ids, output_attentions=True).attentions
    assert torch.equal(plain, out.logits)
    assert probe.calls == 2
    for layer_mass, probs in zip(probe.per_layer, attentions):
        torch.testing.assert_close(layer_mass, probs.sum(dim=(1, 2)), atol=1e-5, rtol=0)


def test_eager_attention_is_invisible_and_refused():
    with pytest.raises(NoAttentionSeenError, match="attn_implementation='eager'"):
        with torch.no_grad():
            probed_forward(_tiny_llama("eager"), input_ids=torch.zeros(1, 5, dtype=torch.long))


def test_out_of_order_exit_and_bad_query_weights_are_clear_errors():
    original = F.scaled_dot_product_attention
    outer, inner = AttentionMassProbe(), AttentionMassProbe()
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(RuntimeError, match="out of order"):
        outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)
    outer.__exit__(None, None, None)
    assert F.scaled_dot_product_attention is original
    q, k, v = _qk()
    with pytest.raises(ValueError, match="query_weights has shape"):
        with AttentionMassProbe(query_weights=torch.ones(B, L + 1)):
            F.scaled_dot_product_attention(q, k, v)
    assert F.scaled_dot_product_attention is original
