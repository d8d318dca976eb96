"""SDPA's output with its row log-sum-exp from one aten call (pipeline/maths/sdpa_lse.py), on the CPU: the route
decision, the call kinds the verdicts are kept by, and the CPU flash op standing in for the CUDA ones."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.maths import sdpa_lse


def _exact_lse(query, key, attn_mask=None, is_causal=False, scale=None):
    """[B, H_q, L] float64 log-sum-exp of the scores, as F.sdpa defines them (GQA by repeating key heads)."""
    k = key.double().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = query.double() @ k.transpose(-1, -2) * (scale or query.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    if is_causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return scores.logsumexp(dim=-1).float()


def _qkv(kv_heads=2, length=29):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, length, 16, generator=g), torch.randn(2, kv_heads, length, 16, generator=g),
            torch.randn(2, kv_heads, length, 16, generator=g))


@pytest.mark.parametrize("backend,eligible,verdict,expected", [
    (sdpa_lse.CUDNN, True, None, "verify"), (sdpa_lse.CUDNN, True, True, "fused"),
    (sdpa_lse.CUDNN, True, False, "separate"), (sdpa_lse.FLASH, True, True, "fused"),
    (sdpa_lse.EFFICIENT, True, None, "verify"), (sdpa_lse.MATH, True, None, "separate"),
    (None, True, None, "separate"), (sdpa_lse.FLASH, False, True, "separate"), (4, True, True, "separate")])
def test_route(backend, eligible, verdict, expected):
    assert sdpa_lse.route(backend, eligible, verdict) == expected


def test_call_kinds_separate_what_can_change_the_bits():
    q, k, _ = _qkv()
    padding = torch.ones(2, 1, 1, 29, dtype=torch.bool)
    kinds = {sdpa_lse.call_kind(sdpa_lse.CUDNN, q, k, None, False),
             sdpa_lse.call_kind(sdpa_lse.FLASH, q, k, None, False),
             sdpa_lse.call_kind(sdpa_lse.CUDNN, q, k, None, True),
             sdpa_lse.call_kind(sdpa_lse.CUDNN, q, k, padding, False),
             sdpa_lse.call_kind(sdpa_lse.CUDNN, q, k, padding.float(), False),
             sdpa_lse.call_kind(sdpa_lse.CUDNN, q, k, torch.ones(2, 1, 29, 29, dtype=torch.bool), False),
             sdpa_lse.call_kind(sdpa_lse.CUDNN, q, q, None, False),  # no GQA
             sdpa_lse.call_kind(sdpa_lse.CUDNN, q[:, :, :7], k, None, False),  # another length
             sdpa_lse.call_kind(sdpa_lse.CUDNN, q.transpose(1, 2).contiguous().transpose(1, 2), k, None, False),
             sdpa_lse.call_kind(sdpa_lse.CUDNN, q.half(), k.half(), None, False)}
    assert len(kinds) == 10
    # other contents of the same shapes: the same verdict
    assert sdpa_lse.call_kind(sdpa_lse.CUDNN, q, k, None, False) == sdpa_lse.call_kind(
        sdpa_lse.CUDNN, torch.randn_like(q), torch.randn_like(k), None, False)


def test_cpu_flash_op_gives_sdpa_bits_and_the_natural_log_lse():
    q, k, v = _qkv()
    mask = torch.arange(29)[None, None, None, :] < torch.tensor([29, 20])[:, None, None, None]
    out, lse = sdpa_lse.aten_attention_with_lse(sdpa_lse.FLASH, q, k, v, mask, 0.0, False, None, float("-inf"))
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
    assert lse.shape == (2, 4, 29) and lse.dtype == torch.float32
    assert torch.allclose(lse, _exact_lse(q, k, mask), atol=1e-5)


def test_lse_matches_ignores_fully_masked_rows_but_not_nan():
    oracle = torch.tensor([[[1.0, float("-inf"), 3.0]]])
    assert sdpa_lse.lse_matches(torch.tensor([[[1.0, -65504.0, 3.0 + 1e-6]]]), oracle)[0]
    assert not sdpa_lse.lse_matches(torch.tensor([[[1.0, 0.0, 3.0 * 1.4426950408889634]]]), oracle)[0]  # log2
    assert not sdpa_lse.lse_matches(torch.tensor([[[1.0, float("nan"), 3.0]]]), oracle)[0]


def test_route_verifies_once_and_falls_back_on_any_failure():
    q, k, v = _qkv()
    route = sdpa_lse.FusedSdpaRoute()
    calls = []

    def oracle(*args):
        calls.append(1)
        return _exact_lse(*args)

    for _ in range(3):
        out, lse, backend = route.attention(q, k, v, None, 0.0, True, None, True, oracle_lse=oracle)
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        assert backend == "flash" and torch.allclose(lse, _exact_lse(q, k, is_causal=True), atol=1e-5)
    assert len(calls) == 1 and list(route.verdicts.values()) == [True]
    # not eligible: dropout, autograd, an exception (GQA heads without enable_gqa), a wrong lse
    assert route.attention(q, k, v, None, 0.1, False, None, True, oracle_lse=oracle) is None
    with torch.enable_grad():
        assert route.attention(q.requires_grad_(), k, v, None, 0.0, True, None, True, oracle_lse=oracle) is None
    q.requires_grad_(False)
    assert route.attention(q, k, v, None, 0.0, False, None, False, oracle_lse=oracle) is None
    assert route.attention(q, k, v, None, 0.0, False, None, True, oracle_lse=lambda *a: _exact_lse(*a) + 1) is None
    assert route.reports[repr(sdpa_lse.call_kind(sdpa_lse.FLASH, q, k, None, False))]["same_output_bits"]
    assert route.attention(q, k, v, None, 0.0, False, None, True, oracle_lse=oracle) is None  # remembered: False


def test_an_lse_in_log2_units_is_recognised_and_converted():
    q, k, v = _qkv()
    route = sdpa_lse.FusedSdpaRoute()
    log2 = 1.4426950408889634
    for _ in range(2):
        _, lse, _ = route.attention(q, k, v, None, 0.0, False, None, True,
                                    oracle_lse=lambda *a: _exact_lse(*a) / log2)  # as if the op's were log2
        assert torch.allclose(lse, _exact_lse(q, k) / log2, atol=1e-5)
    (report,) = route.reports.values()
    assert report["lse_unit"] == "log2"
