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
