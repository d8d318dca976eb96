"""Test-only references and helpers: the float64 attention mass every mass path is checked against, and one
forward under a fresh probe.  The benchmarks (run from the repository root) import them from here too."""
from __future__ import annotations

import math

import torch

from pipeline.maths.attention import AttentionMassProbe, _as_heads, _mask_as_4d


def naive_attention_mass(query, key, attn_mask=None, is_causal=False, scale=None, query_weights=None) -> torch.Tensor:
    """The full [B, H, L, S] softmax in float64 with repeated key heads: what every mass path must equal."""
    q, k = _as_heads(query).double(), _as_heads(key).double()
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    mask = _mask_as_4d(attn_mask, query)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    if is_causal:
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if query_weights is not None:
        probs = probs * query_weights.double().reshape(q.shape[0], 1, q.shape[2], 1)
    return probs.sum(dim=(1, 2)).float()


def probed_forward(model, *args, per_layer: bool = False, query_weights=None, chunk_size: int = 128, **kwargs):
    """One forward under a fresh probe: returns (model output, probe), raising if no attention was seen."""
    with AttentionMassProbe(per_layer=per_layer, query_weights=query_weights, chunk_size=chunk_size) as probe:
        out = model(*args, **kwargs)
    probe.require_attention(model)
    return out, probe
