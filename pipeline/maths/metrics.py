"""Masked-diffusion perplexity: the Monte Carlo negative ELBO on held-out windows, as a torchmetrics metric.

For each window x_0 with global index i, n_t timesteps t_k = (k + u_i)/n_t stratify (0, 1] (u_i from the
seed), and x_t is masked with noise seeded by (seed, i, k).  The estimate is
    nll(x_0) = mean_k Σ_{masked} CE(x_0, model(x_t)) / p(t_k),
reported per scored token.  Masks depend only on (seed, i, k), so two models (dense, pruned) are compared
on identical masks: the difference between them has far less variance than either estimate.
"""
from __future__ import annotations

import math

import torch
from torchmetrics import Metric

from pipeline.maths.diffusion import (DEFAULT_EPS, forward_process, masked_token_nll, noise_seed, per_sample_tokens,
                                      per_sample_uniform, token_seed)


class MaskedDiffusionPerplexity(Metric):
    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("nll_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll_per_sample: torch.Tensor, tokens_per_sample: torch.Tensor) -> None:
        self.nll_sum += nll_per_sample.double().sum()
        self.tokens += tokens_per_sample.double().sum()

    def compute(self) -> dict[str, float]:
        nats = (self.nll_sum / self.tokens.clamp_min(1)).item()
        return {"nll": nats, "ppl": math.exp(min(nats, 700.0)), "tokens": int(self.tokens.item())}


@torch.no_grad()
def elbo_nll(
    logits_fn,
    input_ids: torch.Tensor,
    keep: torch.Tensor,
    indices: list[int],
    mask_token_id: int,
    *,
    n_timesteps: int = 8,
    seed: int = 0,
    eps: float = DEFAULT_EPS,
    noise: str = "mask",
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window (Σ_t-averaged masked NLL, number of scored tokens).  logits_fn(ids) -> [B, L, V].
    noise="uniform": noised positions hold random tokens of [0, vocab_size) (see forward_process)."""
    b, length = input_ids.shape
    total = torch.zeros(b, dtype=torch.float64)
    offsets = torch.tensor(
        [torch.rand(1, generator=torch.Generator().manual_seed(noise_seed(seed, i, -1))).item() for i in indices]
    )
    for k in range(n_timesteps):
        t = ((k + offsets) / n_timesteps).clamp_min(1e-6)
        seeds = [noise_seed(seed, i, k) for i in indices]
        uniform = per_sample_uniform((b, length), seeds)
        replacement = per_sample_tokens((b, length), [token_seed(s) for s in seeds], vocab_size) if noise == "uniform" else None
        noisy, masked, p_mask = forward_process(input_ids, t, mask_token_id, eps=eps, keep=keep, uniform=uniform,
                                                noise=noise, vocab_size=vocab_size, replacement=replacement)
        logits = logits_fn(noisy)
        total += (masked_token_nll(logits, input_ids, masked) / p_mask.squeeze(1)).double().cpu()
    scored = (~keep).sum(dim=1).double().cpu()
    return total / n_timesteps, scored


def paired_difference(dense: dict, pruned: dict) -> dict | None:
    """Pruned − dense per-token NLL on the windows both scored, with its standard error.

    dense, pruned: {window index: (summed NLL, scored tokens)}, from the same masks (same seed, index,
    timestep), so the per-window differences δ_i = nll_p,i − nll_d,i share the Monte Carlo noise of both.
    Δ = Σδ_i / ΣT_i (the difference of the two reported NLLs), and its standard error is the ratio
    estimator's, sqrt(n/(n−1) · Σ(δ_i − T_i·Δ)²) / ΣT_i (with equal T_i: std(δ_i/T, ddof=1)/√n)."""
    common = sorted(set(dense) & set(pruned))
    if not common:
        return None
    deltas = [pruned[i][0] - dense[i][0] for i in common]
    tokens = [dense[i][1] for i in common]
    total = sum(tokens)
    if total <= 0:
        return None
    delta = sum(deltas) / total
    n = len(common)
    spread = sum((d - t * delta) ** 2 for d, t in zip(deltas, tokens))
    stderr = math.sqrt(n / (n - 1) * spread) / total if n > 1 else None
    return {"delta_nll": delta, "stderr": stderr, "windows": n, "tokens": int(total),
            "z": delta / stderr if stderr else None}


def paired_items(dense: dict, pruned: dict) -> dict | None:
    """Pruned − dense mean of a per-item score (e.g. accuracy 0/1 per question) over the shared items, with
    the paired standard error std(p_i − d_i, ddof=1)/√n."""
    common = sorted(set(dense) & set(pruned), key=str)
    if not common:
        return None
    diffs = [float(pruned[k]) - float(dense[k]) for k in common]
    n = len(diffs)
    mean = sum(diffs) / n
    stderr = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
    return {"delta": mean, "stderr": stderr, "items": n, "changed": sum(d != 0 for d in diffs)}


def within_noise(delta: float, stderr: float | None, z: float = 1.96) -> bool:
    """|Δ| below z standard errors (a two-sided 95% paired test; with no spread, only Δ = 0 is noise)."""
    if stderr is None or stderr == 0:
        return delta == 0
    return abs(delta) < z * stderr
