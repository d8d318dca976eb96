"""The reference implementation's formulas, re-derived from docs/reference.md (not copied from its code), as
plain, slow, float64 tensor functions: the oracle for a future `flavor="reference"` on tiny-llada.

Shapes: mass [B, T]; x [B, T, d_in] one Linear's inputs for one noised batch; s [B, T] sink scores;
W [d_out, d_in].  Masks are bool, True = pruned.
"""
from __future__ import annotations

import torch


def sink_scores(mass: torch.Tensor, std_factor: float = 2.0, alpha: float = 5.0) -> torch.Tensor:
    """s = sigmoid(alpha · (mass − (mean + std_factor · std))) per row, population std over all positions."""
    m = mass.double()
    mean = m.mean(dim=1, keepdim=True)
    std = ((m - mean) ** 2).mean(dim=1, keepdim=True).sqrt()
    return torch.sigmoid(alpha * (m - (mean + std_factor * std)))


def attention_mass(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, T_k]: softmax(q·kᵀ/√d) summed over queries and heads (q [B, H, T, d], k [B, H_kv, T, d])."""
    q, k = q.double(), k.double()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return probs.sum(dim=2).sum(dim=1)


def wanda_norm_sum(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Σ over (batch, timestep) of ‖(x ⊙ (1 − s)) over the batch's B·T rows‖₂, per input feature.

    batches: one (x [B, T, d_in], s [B, T]) per (batch, timestep)."""
    total = None
    for x, s in batches:
        y = (x.double() * (1.0 - s.double()).unsqueeze(-1)).reshape(-1, x.shape[-1])
        norm = (y * y).sum(dim=0).sqrt()
        total = norm if total is None else total + norm
    return total


def sink_wanda_mask(weight: torch.Tensor, norm_sum: torch.Tensor, sparsity: float) -> torch.Tensor:
    """|W| · norm_sum (no square root), the int(d_in · sparsity) smallest of every row (N:M never applies)."""
    metric = weight.double().abs() * norm_sum.double().unsqueeze(0)
    return per_row_lowest(metric, int(weight.shape[1] * sparsity))


def per_row_lowest(metric: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` smallest entries of every row; ties to the earlier column."""
    mask = torch.zeros_like(metric, dtype=torch.bool)
    for r in range(metric.shape[0]):
        order = sorted(range(metric.shape[1]), key=lambda c: (float(metric[r, c]), c))
        mask[r, order[:count]] = True
    return mask


def mean_over_timesteps(scores: list[torch.Tensor]) -> torch.Tensor:
    """s̄ = (1/n_t) Σ_t s_t for one batch ([B, T] each)."""
    return sum(s.double() for s in scores) / len(scores)


def weighted_hessian(inputs: list[torch.Tensor], mean_scores: list[torch.Tensor]) -> torch.Tensor:
    """H = (2/N) Σ_j X̃_jᵀ X̃_j with X̃_j = x_j ⊙ (1 − s̄_j): x_j [T, d_in] the clean input of window j, s̄_j [T]."""
    d = inputs[0].shape[-1]
    h = torch.zeros(d, d, dtype=torch.float64)
    for x, s in zip(inputs, mean_scores):
        y = x.double() * (1.0 - s.double()).unsqueeze(-1)
        h += y.T @ y
    return h * (2.0 / len(inputs))


def blockwise_threshold_mask(saliency: torch.Tensor, sparsity: float, blocksize: int = 128) -> torch.Tensor:
    """SparseGPT's unstructured selection: per block of `blocksize` columns, one threshold over all its rows,
    thresh = (sorted saliencies of the block)[int(numel · sparsity)], pruned where saliency ≤ thresh."""
    mask = torch.zeros_like(saliency, dtype=torch.bool)
    for start in range(0, saliency.shape[1], blocksize):
        block = saliency[:, start:start + blocksize]
        flat = sorted(float(v) for v in block.flatten())
        thresh = flat[int(block.numel() * sparsity)]
        mask[:, start:start + blocksize] = block <= thresh
    return mask


def layerwise_threshold_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The reference's unstructured magnitude: one threshold per layer, prune |W| ≤ sorted(|W|)[int(numel·s)]."""
    flat = sorted(float(v) for v in weight.abs().flatten())
    return weight.abs() <= flat[int(weight.numel() * sparsity)]
