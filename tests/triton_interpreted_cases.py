"""Cases for the fused Triton attention-mass kernel, run on CPU tensors by Triton's interpreter (float64 oracle).

Not collected by a plain `pytest`: tests/test_attention_triton.py runs this file in a subprocess with
TRITON_INTERPRET=1, which must be set before triton is first imported (triton.language's own helpers are decorated
then), so that the very kernel source that runs on CUDA runs here tile by tile.  Shapes stay tiny (T <= 40, D = 16,
blocks of 16): the interpreter is numpy, not a GPU.  By hand:

    TRITON_INTERPRET=1 python -m pytest tests/triton_interpreted_cases.py -q
"""
import os

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run with TRITON_INTERPRET=1 (tests/test_attention_triton.py does)")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.maths import attention_triton as kernels  # noqa: E402
from pipeline.maths.attention import AttentionMassProbe, attention_mass  # noqa: E402
from tests.oracles import naive_attention_mass  # noqa: E402

# numpy's warnings from inside the interpreter (log(0) = -inf for a fully masked row, -inf - -inf before a where) are
# the arithmetic the kernel means; the assertions check its results
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
BLOCKS = {"block_m": 16, "block_n": 16, "num_warps": 1, "num_stages": 1}
kernels.DEFAULT_CONFIG.update(BLOCKS)  # what the probe launches here
kernels.FLOAT32_CONFIG.update(BLOCKS)
assert kernels.INTERPRETED


def _qk(batch=2, heads=4, kv_heads=4, q_len=37, k_len=37, dim=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g) * 2
    k = torch.randn(batch, kv_heads, k_len, dim, generator=g) * 2
    k[:, :, 0] *= 3  # a key that most queries favour, as a sink
    return q.to(dtype), k.to(dtype)


def _assert_close_to_exact(mass, exact):
    assert mass.dtype == torch.float32 and mass.shape == exact.shape
    assert ((mass.double() - exact.double()).abs().max() / exact.abs().max()).item() <= 1e-5


def _padding(lengths, k_len):
    return torch.arange(k_len)[None, :] < torch.tensor(lengths)[:, None]  # [B, S] True = real token


def _block_causal(length, block):
    blocks = torch.arange(length) // block
    return blocks[:, None] >= blocks[None, :]  # [L, S]: a query sees its own block and the ones before


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("is_causal", [False, True])
def test_plain_gqa_and_causal_match_float64(kv_heads, is_causal):
    q, k = _qk(kv_heads=kv_heads)
    mass = kernels.attention_mass_triton(q, k, is_causal=is_causal, **BLOCKS)
    exact = naive_attention_mass(q, k, is_causal=is_causal)
    _assert_close_to_exact(mass, exact)
    assert mass.sum().item() == pytest.approx(2 * 4 * 37, rel=1e-5)  # every query of every head sums to 1


def test_query_heads_sharing_a_key_head_are_summed_not_averaged():
    q, k = _qk(kv_heads=1)
    mass = kernels.attention_mass_triton(q, k, **BLOCKS)
    summed = sum(naive_attention_mass(q[:, h:h + 1], k) for h in range(4))
    _assert_close_to_exact(mass, summed)


@pytest.mark.parametrize("q_len,k_len,block_m,block_n", [(5, 37, 16, 16), (40, 23, 16, 32), (33, 40, 32, 16)])
def test_causal_with_unequal_lengths_is_top_left_aligned(q_len, k_len, block_m, block_n):
    q, k = _qk(q_len=q_len, k_len=k_len, kv_heads=2)
    mass = kernels.attention_mass_triton(q, k, is_causal=True, block_m=block_m, block_n=block_n)
    _assert_close_to_exact(mass, naive_attention_mass(q, k, is_causal=True))


def test_padding_masks_bool_and_additive_broadcast_over_heads_and_queries():
    q, k = _qk(kv_heads=2)
    keep = _padding([37, 21], 37)[:, None, None, :]  # [B, 1, 1, S]
    additive = torch.zeros(2, 1, 1, 37).masked_fill(~keep, torch.finfo(torch.float32).min)
    from_bool = kernels.attention_mass_triton(q, k, keep, **BLOCKS)
    from_float = kernels.attention_mass_triton(q, k, additive, **BLOCKS)
    _assert_close_to_exact(from_bool, naive_attention_mass(q, k, attn_mask=keep))
    _assert_close_to_exact(from_float, naive_attention_mass(q, k, attn_mask=additive))
    assert from_bool[1, 21:].abs().max() == 0 and from_float[1, 21:].abs().max() == 0  # padding receives nothing


def test_block_causal_bool_mask_and_query_weights():
    """SDAR / LLaDA2's [B, 1, L, S] block-causal mask with padding folded in, and padding queries weighted out."""
    q, k = _qk(kv_heads=2, q_len=38, k_len=38)
    valid = _padding([38, 29], 38)
    mask = (_block_causal(38, 8)[None] & valid[:, None, :])[:, None]  # [B, 1, L, S]
    mass = kernels.attention_mass_triton(q, k, mask, query_weights=valid, **BLOCKS)
    _assert_close_to_exact(mass, naive_attention_mass(q, k, attn_mask=mask, query_weights=valid))
    assert mass[1, 29:].abs().max() == 0
    probabilities = torch.rand(2, 38, generator=torch.Generator().manual_seed(3))  # float weights too
    _assert_close_to_exact(kernels.attention_mass_triton(q, k, mask, query_weights=probabilities, **BLOCKS),
                           naive_attention_mass(q, k, attn_mask=mask, query_weights=probabilities))


def test_full_float_mask_custom_scale_and_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(2, 29, 4, 32, generator=g) * 2).transpose(1, 2)  # [B, H, L, D] over a [B, L, H, D] buffer
    k = (torch.randn(2, 31, 2, 32, generator=g) * 2).transpose(1, 2)
    bias = torch.randn(2, 4, 29, 31, generator=g)  # a different additive mask per head and query
    mass = kernels.attention_mass_triton(q, k, bias, scale=0.3, **BLOCKS)
    _assert_close_to_exact(mass, naive_attention_mass(q, k, attn_mask=bias, scale=0.3))


def test_fully_masked_row_contributes_zero_like_the_chunked_path():
    q, k = _qk(kv_heads=2)
    mask = torch.ones(2, 1, 37, 37, dtype=torch.bool)
    mask[0, :, 4] = False  # query 4 of sample 0 sees no key at all
    mask[1, :, :, 30:] = False
    mass = kernels.attention_mass_triton(q, k, mask, **BLOCKS)
    chunked = attention_mass(q, k, mask)
    _assert_close_to_exact(mass, naive_attention_mass(q, k, attn_mask=mask))
    assert torch.isfinite(mass).all()
    assert mass[0].sum().item() == pytest.approx(4 * 36, rel=1e-5) == chunked[0].sum().item()  # one row short


def test_nan_input_gives_nan_mass_not_a_silent_zero():
    q, k = _qk()
    q[1, 2, 7, 3] = float("nan")
    mass = kernels.attention_mass_triton(q, k, **BLOCKS)
    chunked = attention_mass(q, k)
    assert torch.equal(mass.isnan(), chunked.isnan()) and mass[1].isnan().all()
    assert torch.isfinite(mass[0]).all()
    padding = _padding([37, 30], 37)[:, None, None, :]  # masked keys (-inf) beside the NaN scores: still NaN
    assert torch.equal(kernels.attention_mass_triton(q, k, padding, **BLOCKS).isnan(), mass.isnan())
    k[0, 1, 11, 0] = float("nan")
    assert kernels.attention_mass_triton(q, k, **BLOCKS).isnan().all()


def test_half_inputs_accumulate_in_float32():
    """float16 here; bfloat16 on the GPU only (benchmarks/mass_kernel_cuda.py): the interpreter's dot multiplies
    bfloat16 tiles as the raw uint16 words it stores them in."""
    q, k = _qk(kv_heads=2, dtype=torch.float16)
    _assert_close_to_exact(kernels.attention_mass_triton(q, k, **BLOCKS), naive_attention_mass(q, k))


def test_same_input_same_bits():
    q, k = _qk(kv_heads=2)
    mask = _padding([37, 30], 37)[:, None, None, :]
    first = kernels.attention_mass_triton(q, k, mask, **BLOCKS)
    assert torch.equal(first, kernels.attention_mass_triton(q, k, mask, **BLOCKS))


def test_no_queries_no_mass():
    q, k = _qk(q_len=0)
    assert torch.equal(kernels.attention_mass_triton(q, k, **BLOCKS), torch.zeros(2, 37))


def test_what_the_kernel_cannot_take_is_named():
    q, k = _qk(dim=16)
    assert kernels.unsupported(q, k) is None
    assert "head dim 48" in kernels.unsupported(*_qk(dim=48))
    assert "dtypes" in kernels.unsupported(q.double(), k.double())
    with pytest.raises(ValueError, match="multiple of key heads"):
        kernels.attention_mass_triton(q, k[:, :3], **BLOCKS)


# --- the probe ------------------------------------------------------------------------------------------------------
def test_probe_uses_the_kernel_where_it_runs_and_leaves_the_output_alone():
    q, k = _qk(kv_heads=2)
    v = torch.randn_like(k)
    mask = _padding([37, 25], 37)[:, None, None, :]
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    with AttentionMassProbe() as probe:
        probed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    # the output and log-sum-exp of the op F.sdpa dispatches to (CPU flash here), then the kernel's mass pass
    assert probe.calls_by_kernel == {"triton+sdpa_lse": 1}
    assert torch.equal(probed, plain)
    _assert_close_to_exact(probe.mass, naive_attention_mass(q, k, attn_mask=mask))
    with AttentionMassProbe(kernel="chunked") as chunked:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert chunked.calls_by_kernel == {"chunked": 1}


def test_reference_order_never_takes_the_kernel():
    q, k = _qk()
    v = torch.randn_like(k)
    with AttentionMassProbe(reference_order=True) as probe:
        F.scaled_dot_product_attention(q, k, v)
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert probe.calls_by_kernel == {"reference": 1, "chunked": 1}
    with pytest.raises(ValueError, match="kernel='triton' contradicts reference_order"):
        AttentionMassProbe(reference_order=True, kernel="triton")


def test_forced_kernel_names_why_it_cannot_run():
    q, k = _qk(dim=48)
    with pytest.raises(ValueError, match="head dim 48"), AttentionMassProbe(kernel="triton"):
        F.scaled_dot_product_attention(q, k, torch.randn_like(k))
    with AttentionMassProbe() as probe:  # auto falls back
        F.scaled_dot_product_attention(q, k, torch.randn_like(k))
    assert probe.calls_by_kernel == {"chunked": 1}


def test_tiny_sdar_block_causal_gqa_through_the_kernel():
    """A real block-diffusion model (Qwen3-style GQA, head dim 16, block-causal mask with padding): the kernel's mass
    equals the chunked probe's, and the logits are bit-for-bit those of an unprobed forward."""
    from pipeline.model.loading import load_dlm

    model, tokenizer = load_dlm("tiny-sdar")
    length = 2 * model.config.block_length + 3
    ids = torch.randint(4, len(tokenizer), (2, length), generator=torch.Generator().manual_seed(0))
    attention_mask = _padding([length, length - 5], length).long()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=attention_mask).logits
        with AttentionMassProbe(query_weights=attention_mask.bool()) as fused:
            logits = model(input_ids=ids, attention_mask=attention_mask).logits
        with AttentionMassProbe(query_weights=attention_mask.bool(), kernel="chunked") as chunked:
            model(input_ids=ids, attention_mask=attention_mask)
    assert fused.calls_by_kernel == {"triton+sdpa_lse": model.config.num_hidden_layers}
    assert torch.equal(logits, plain)
    assert ((fused.mass - chunked.mass).abs().max() / chunked.mass.abs().max()).item() <= 1e-5
    assert fused.mass[1, length - 5:].abs().max() == 0


def test_a_given_row_logsumexp_skips_the_first_pass():
    """What a flash-attention forward returns as its log-sum-exp serves as well as the kernel's own first pass."""
    q, k = _qk(kv_heads=2)
    scores = q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2) / 4.0  # 1/sqrt(16)
    lse = scores.logsumexp(dim=-1).float()  # [B, H, L]
    mass = kernels.attention_mass_triton(q, k, row_logsumexp=lse, **BLOCKS)
    _assert_close_to_exact(mass, naive_attention_mass(q, k))
    assert torch.equal(mass, kernels.attention_mass_triton(q, k, row_logsumexp=lse, **BLOCKS))


def test_tiles_that_do_not_fit_the_gpu_fall_back_to_the_chunked_path(monkeypatch):
    """A GPU with less shared memory than the tiles need refuses the launch (OutOfResources, which the interpreter
    never raises, so a stand-in raises it here): auto takes the chunked path for that call, "triton" reports it."""
    from pipeline.maths import attention as attention_module

    def refused(*args, **kwargs):
        raise kernels.OutOfResources(200_000, 101_376, "shared memory")

    monkeypatch.setattr(attention_module, "triton_attention_mass", refused)
    q, k = _qk(kv_heads=2)
    v = torch.randn_like(k)
    with AttentionMassProbe(chunk_size=5) as probe:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert probe.calls_by_kernel == {"chunked": 1}
    assert torch.equal(probe.mass, attention_mass(q, k, chunk_size=5))
    with pytest.raises(kernels.OutOfResources), AttentionMassProbe(kernel="triton"):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


# --- the output and log-sum-exp from one aten call (pipeline/maths/sdpa_lse.py) ---------------------------------------
@pytest.fixture
def fresh_route(monkeypatch):
    """A verdict cache of its own: FUSED_SDPA lives as long as the process."""
    from pipeline.maths import attention as attention_module, sdpa_lse

    route = sdpa_lse.FusedSdpaRoute()
    monkeypatch.setattr(attention_module, "FUSED_SDPA", route)
    return route


def _probed(q, k, v, **kwargs):
    with AttentionMassProbe() as probe:
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    return out, probe


def test_each_kind_of_call_is_verified_once_then_fused(fresh_route):
    q, k = _qk(kv_heads=2)
    v = torch.randn_like(k)
    mask = _block_causal(37, 8)[None, None] & _padding([37, 30], 37)[:, None, None, :]
    for _ in range(2):
        out, probe = _probed(q, k, v, attn_mask=mask, enable_gqa=True)
        assert probe.calls_by_kernel == {"triton+sdpa_lse": 1}
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
        _assert_close_to_exact(probe.mass, naive_attention_mass(q, k, attn_mask=mask))
    assert list(fresh_route.verdicts.values()) == [True]  # one kind, verified once
    (report,) = fresh_route.reports.values()
    assert report["same_output_bits"] and report["lse_max_abs_diff"] <= 8e-6
    _probed(q, k, v, is_causal=True, enable_gqa=True)
    assert len(fresh_route.verdicts) == 2  # a new kind: verified on its own


def test_a_kind_that_failed_verification_keeps_the_separate_lse_pass(fresh_route, monkeypatch):
    from pipeline.maths import sdpa_lse

    monkeypatch.setattr(sdpa_lse, "LSE_TOLERANCE", -1.0)  # no log-sum-exp is close enough
    q, k = _qk()
    v = torch.randn_like(k)
    for _ in range(2):
        out, probe = _probed(q, k, v)
        assert probe.calls_by_kernel == {"triton": 1}
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert list(fresh_route.verdicts.values()) == [False]


def test_a_failing_aten_op_falls_back_to_sdpa_silently(fresh_route, monkeypatch):
    from pipeline.maths import sdpa_lse

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(sdpa_lse, "aten_attention_with_lse", broken)
    q, k = _qk()
    v = torch.randn_like(k)
    out, probe = _probed(q, k, v)
    assert probe.calls_by_kernel == {"triton": 1}
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    _assert_close_to_exact(probe.mass, naive_attention_mass(q, k))


def test_nested_probes_both_see_the_call(fresh_route):
    """The inner probe wraps the outer one, not F.sdpa: it calls through it (the outer probe must see the call);
    the outer one, wrapping the builtin, may take the fused op."""
    q, k = _qk()
    v = torch.randn_like(k)
    with AttentionMassProbe() as outer, AttentionMassProbe() as inner:
        out = F.scaled_dot_product_attention(q, k, v)
    assert inner.calls_by_kernel == {"triton": 1} and outer.calls_by_kernel == {"triton+sdpa_lse": 1}
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert torch.allclose(inner.mass, outer.mass, rtol=1e-5, atol=1e-6)
