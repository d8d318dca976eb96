"""Float64 one-call forms of the calibration statistics (pipeline/maths/sparsity.py computes them per sample in
float32 for exact cross-rank sums): the tests' oracle, and the old implementation benchmarks/calibration_cost.py
times against."""
from __future__ import annotations

import torch


def new_act_sq_sum(in_features: int, device=None) -> torch.Tensor:
    return torch.zeros(in_features, dtype=torch.float64, device=device)


def new_hessian(in_features: int, device=None) -> torch.Tensor:
    return torch.zeros(in_features, in_features, dtype=torch.float64, device=device)


def _weighted_rows(x: torch.Tensor, row_weights: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """x as a contiguous float64 [tokens, in_features] matrix, each row scaled by its token's weight.

    The result is always contiguous, so the reductions that follow see the same memory layout (hence
    the same summation order) with or without weights; multiplying by 1.0 is exact, so
    row_weights=ones gives bit-identical statistics to row_weights=None.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"activations have {x.shape[-1]} features but the accumulator has {in_features}; "
                         "accumulate the inputs of the layer the statistic belongs to")
    rows = x.reshape(-1, in_features).to(torch.float64).contiguous()
    if row_weights is None:
        return rows
    weights = row_weights.reshape(-1).to(device=rows.device, dtype=torch.float64)
    if weights.shape[0] != rows.shape[0]:
        raise ValueError(f"row_weights has {weights.shape[0]} entries for {rows.shape[0]} tokens; "
                         "give one weight per token (flattened like x)")
    return (rows * weights.unsqueeze(1)).contiguous()


def accumulate_act_sq_sum(acc: torch.Tensor, x: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """acc[j] += Σ_t (w_t · x_tj)^2, in place; returns acc.  x is [tokens, in] (or [..., in], flattened)."""
    rows = _weighted_rows(x, row_weights, acc.shape[0])
    acc += (rows * rows).sum(dim=0)
    return acc


def accumulate_hessian(hessian: torch.Tensor, x: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """H += (w·x)^T (w·x), in place; returns H.  SparseGPT's 2/n scale is left out: the solve is scale-free."""
    rows = _weighted_rows(x, row_weights, hessian.shape[0])
    hessian.addmm_(rows.T, rows)
    return hessian
