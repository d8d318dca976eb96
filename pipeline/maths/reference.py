"""The reference implementation's own rules (github VILA-Lab/Sink-Aware-Pruning), where they differ from
pipeline/maths/sparsity.py: pure tensor functions used by flavor="reference" (pipeline/maths/pruners.py).

Written from the reference's description (docs/reference.md), in its order of floating-point operations, so that
single-process, with its noise order and one reduction slot, the masks and weights are the reference's bit for bit:

    H, n = zeros(d, d), 0
    for x_j in windows:                              # x_j [T, d_in], one window at a time, in order
        add_running_hessian_(H, n, x_j, 1 - s̄_j); n += 1
    W_new, mask, info = fasterprune(W, H, sparsity=0.5)

  * the Hessian is SparseGPT's running average in float32: H ← H·n/(n+1), then H += (√(2/(n+1))·x)ᵀ(√(2/(n+1))·x);
  * the solve (`fasterprune`): damping percdamp·mean(diag H), H⁻¹'s upper Cholesky factor through
    cholesky → cholesky_inverse → cholesky, one saliency threshold per 128-column block over all rows (rows vary),
    N:M by topk, a column-by-column OBS update and a lazy GEMM update of the later blocks, value for value.
"""
from __future__ import annotations

import math

import torch

from pipeline.maths.sparsity import _check_sparsegpt_args, _lowest_per_row, _retry_percdamp, select_mask


def blockwise_threshold(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The reference's shared threshold: sorted(scores.flatten())[int(numel · sparsity)] (prune scores ≤ it)."""
    flat = scores.flatten()
    index = min(int(flat.numel() * sparsity), flat.numel() - 1)
    return torch.kthvalue(flat, index + 1).values


def layerwise_magnitude_mask(weight: torch.Tensor, sparsity: float | None, n_m=None) -> torch.Tensor:
    """The reference's magnitude pruning: unstructured, one threshold per layer (|W| ≤ sorted(|W|)[int(numel·s)],
    rows vary); N:M, the N smallest |W| of every M."""
    scores = weight.float().abs()
    if n_m is not None:
        return select_mask(scores, None, n_m)
    return scores <= blockwise_threshold(scores, sparsity)


def wanda_variant_mask(metric: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, float]:
    """Wanda's `use_variant` (the reference's `prune_wanda`, `return_given_alpha`): per row, prune the weights whose
    cumulative sorted metric is ≤ alpha · (row sum); alpha bisected on [0, 0.8] from 0.4 until the layer's sparsity is
    within 0.001 of the target (or the interval is under 0.001).  Returns (mask, alpha)."""
    sorted_metric = torch.sort(metric, dim=-1, stable=True).values
    cumulative = torch.cumsum(sorted_metric, dim=1)
    row_sum = metric.sum(dim=1)

    def given(alpha: float):
        count = (cumulative <= (row_sum * alpha).reshape(-1, 1)).sum(dim=1, keepdim=True)
        # a row with no weight under the threshold prunes nothing (the reference's gather at index -1 would fail)
        mask = (metric <= torch.gather(sorted_metric, 1, (count - 1).clamp_min(0))) & (count > 0)
        return mask, float(mask.sum()) / mask.numel()

    alpha, low, high = 0.4, 0.0, 0.8
    mask, current = given(alpha)
    while abs(current - sparsity) > 0.001 and high - low >= 0.001:
        if current > sparsity:
            alpha, high = (alpha + low) / 2.0, alpha
        else:
            alpha, low = (alpha + high) / 2.0, alpha
        mask, current = given(alpha)
    return mask, alpha


# --- sink scores as the reference computes them (flavor "reference-exact" selects these, pipeline/maths/flavors.py) ---

def collector_attention_mass(query: torch.Tensor, key: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """[B, T_k] float32: the reference's `attn_collector` on one attention call (q [B, H, T, hd], k [B, H_kv, T, hd]):
    the whole [B, H, T, T] softmax of q·kᵀ/√hd (key heads repeated), summed over queries, then over heads."""
    q, k = query.detach(), key.detach()
    if k.size(1) != q.size(1):
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1, output_size=q.size(1))
    scores = torch.matmul(q, k.transpose(-2, -1))
    scores = scores / math.sqrt(q.size(-1)) if scale is None else scores * scale
    return torch.softmax(scores.float(), dim=-1).sum(dim=2).sum(dim=1)


def collector_sink_scores(mass: torch.Tensor, std_factor: float = 2.0, alpha: float = 5.0) -> torch.Tensor:
    """The reference's `_compute_sink_mask`: sigmoid(alpha · (mass − (mean + std_factor · population std))) per row."""
    mean = mass.mean(dim=1, keepdim=True)
    std = mass.std(dim=1, keepdim=True, unbiased=False)
    return torch.sigmoid(alpha * (mass - (mean + std_factor * std)))


# --- sink Wanda as the reference computes it ----------------------------------------------------------------------

def window_norms(x: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """[d_in] float32: ‖x ⊙ w‖₂ over one window's rows (x [T, d_in] in the model's dtype, w [T] multiplied in it)."""
    if row_weights is not None:
        x = x * row_weights.to(x.device, x.dtype).unsqueeze(-1)
    return torch.norm(x.reshape(-1, x.shape[-1]).float(), p=2, dim=0)


def lowest_by_topk(metric: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` lowest entries of every row as the reference picks them (`topk(largest=False)`; its tie order)."""
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if count > 0:
        mask.scatter_(1, torch.topk(metric, count, dim=1, largest=False).indices, True)
    return mask


# --- SparseGPT as the reference computes it ------------------------------------------------------------------

def add_running_hessian_(hessian: torch.Tensor, seen: int, x: torch.Tensor, row_weights: torch.Tensor | None = None):
    """One window into SparseGPT's running-average Hessian, in place (float32 [d, d]); `seen` = windows already in it.

    x [T, d] in the model's dtype; row_weights [T] (1 − s̄) multiply it in that dtype, as the reference's hook does."""
    if hessian.dtype != torch.float32 or hessian.shape != (x.shape[-1], x.shape[-1]):
        raise ValueError(f"accumulator {tuple(hessian.shape)} {hessian.dtype} does not fit activations {tuple(x.shape)}; "
                         "use a float32 [in_features, in_features] accumulator for this layer")
    if row_weights is not None:
        x = x * row_weights.to(x.device, x.dtype).unsqueeze(-1)
    hessian *= seen / (seen + 1)
    scaled = (math.sqrt(2 / (seen + 1)) * x.reshape(-1, x.shape[-1]).t().float())  # [d, T], a transposed view's layout
    hessian += scaled.matmul(scaled.t())
    return hessian


def _damped_inverse_upper(hessian: torch.Tensor, percdamp: float, max_damp_retries: int):
    """Upper Cholesky factor of (H + damp·I)⁻¹ by the reference's three factorisations; a failure (where the reference
    stops with an error) is retried with 10x the damping.  Returns (factor, percdamp used, damp, retries)."""
    mean_diag = torch.mean(torch.diag(hessian))
    diag = torch.arange(hessian.shape[0], device=hessian.device)
    for retries in range(max_damp_retries + 1):
        used = _retry_percdamp(percdamp, retries)
        damp = used * mean_diag
        damped = hessian.clone()
        damped[diag, diag] += damp
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, used, float(damp), retries
    raise RuntimeError(f"SparseGPT: Cholesky of the Hessian failed even with percdamp={used:g} after {max_damp_retries} "
                       "10x retries; check the calibration inputs or raise percdamp")


def _block_mask(block_t, hinv_diag, start, end, sparsity, threshold) -> torch.Tensor:
    """[count, rows] (the block transposed): saliency w² / [H⁻¹]_jj², one threshold over the whole block."""
    saliency = block_t ** 2 / hinv_diag.reshape((-1, 1)) ** 2
    if threshold == "block":
        return saliency <= blockwise_threshold(saliency, sparsity)
    # ablation: the same count from every row
    return _lowest_per_row(saliency.t(), int(end * sparsity) - int(start * sparsity)).t()


def fasterprune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None, n_m=None,
                blocksize: int = 128, percdamp: float = 0.01, max_damp_retries: int = 3,
                threshold: str = "block") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The reference's SparseGPT solve on H (its running average, float32): (pruned weight in weight's dtype, bool
    mask with True = pruned, info: "percdamp", "damp", "retries", "dead_inputs", "loss").  threshold="row" (an
    ablation, not the reference) prunes the same count from every row of a block instead of one shared threshold.

    Every value is the reference's: the per-column steps are elementwise (w / d, w − err·h: the same in any layout),
    so a block is walked transposed (column i of W = row i, contiguous), and the column i just pruned is left as it
    was instead of being updated and then overwritten; the lazy update of later blocks, a GEMM whose summation order
    depends on its operands' layout, gets them in the reference's layout."""
    sparsity, n_m = _check_sparsegpt_args(weight, hessian, sparsity, n_m, blocksize, percdamp)
    W = weight.detach().clone().float()
    H = hessian.detach().to(W.device, torch.float32, copy=True)
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, used, damp, retries = _damped_inverse_upper(H, percdamp, max_damp_retries)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    loss = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1t, Hinv1 = W[:, i1:i2].t().contiguous(), Hinv[i1:i2, i1:i2]   # W1t [count, rows]
        hinv_diag = torch.diag(Hinv1)
        mask1t = (_block_mask(W1t, hinv_diag, i1, i2, sparsity, threshold) if n_m is None
                  else torch.zeros_like(W1t, dtype=torch.bool))
        keep1t = ~mask1t
        Err1t = torch.empty_like(W1t)
        # row views, so that the loop indexes Python lists; hcol[i, j] = [[H⁻¹_ij]] ([1, 1], broadcast over rows)
        w_rows, keep_rows, err_rows, d = W1t.unbind(0), keep1t.unbind(0), Err1t.unbind(0), hinv_diag.unbind(0)
        hcol = Hinv1.unsqueeze(2)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                group = slice(i, i + n_m[1])
                tmp = (W1t[group] ** 2 / hinv_diag[group].reshape((-1, 1)) ** 2).t()      # [rows, M], as the reference
                mask1t[group].t().scatter_(1, torch.topk(tmp, n_m[0], dim=1, largest=False)[1], True)
                keep1t[group] = ~mask1t[group]
            # err = (w − q) / d with q = w where kept, 0 where pruned: w − q is w or +0 exactly
            err = torch.div(w_rows[i].masked_fill(keep_rows[i], 0), d[i], out=err_rows[i])
            # OBS update of the later columns: w_j −= H⁻¹_ij · err, each product rounded once (the reference's K = 1 matmul)
            W1t[i + 1:].sub_(hcol[i, i + 1:] * err)
        W[:, i1:i2] = W1t.masked_fill_(mask1t, 0).t()
        mask[:, i1:i2] = mask1t.t()
        loss += float((Err1t.double() ** 2).sum()) / 2
        W[:, i2:] -= Err1t.t().contiguous().matmul(Hinv[i1:i2, i2:])  # lazy update of every later block
    info = {"percdamp": used, "damp": damp, "retries": retries, "dead_inputs": int(dead.sum()), "loss": loss}
    return W.to(weight.dtype), mask, info
