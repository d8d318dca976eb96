"""Pruning algorithms as pure tensor functions: scores, calibration statistics, masks and the SparseGPT solve.

Nothing here knows about hooks, modules or Lightning; callbacks/prune.py does the orchestration.  All
functions work on one linear layer's weight W [out_features, in_features] and statistics of its input
activations x [tokens, in_features] (or [samples, tokens, in_features]).

    act_sq_sum = sample_act_sq_sums(x, row_weights=1 - sink_score).sum(0)     # x: [samples, T, d_in]
    mask = select_mask(wanda_scores(W, act_sq_sum), sparsity=0.5)            # True = prune
    apply_mask_(W, mask)

    H = torch.zeros(d_in, d_in)
    for x_b, s_b in zip(x, sink_score):
        add_sample_hessian_(H, x_b, row_weights=1 - s_b)
    W_new, mask, info = sparsegpt_prune(W, H, n_m=(2, 4))

(tests/float64_statistics.py holds float64 one-call forms of the same statistics, the tests' oracle.)

Conventions shared by every method (and checked by pipeline.evaluation.report):
  * the comparison group is one output row: unstructured pruning removes exactly
    int(in_features * sparsity) weights from every row; N:M removes exactly N of every M consecutive
    input weights of a row ("2:4" = 2 zeros per group of 4, as Wanda and SparseGPT's prune_n/prune_m);
  * ties are broken by position (stable sort), so the same inputs always give the same mask.
"""
from __future__ import annotations

import torch


# --- scores --------------------------------------------------------------------------------------------

def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs()


def wanda_scores(weight: torch.Tensor, act_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, with act_sq_sum[j] = Σ_t x_tj^2 (a sum or a mean: per-row ranking is the same)."""
    if act_sq_sum.dim() != 1 or act_sq_sum.shape[0] != weight.shape[1]:
        raise ValueError(
            f"act_sq_sum has shape {tuple(act_sq_sum.shape)} but the weight has {weight.shape[1]} inputs; "
            "pass the per-input-feature sum of squared activations, shape [in_features]"
        )
    act_norm = act_sq_sum.to(torch.float64).sqrt().to(weight.dtype)
    return weight.abs() * act_norm.unsqueeze(0)


# --- per-sample statistics for exact cross-rank sums ---------------------------------------------------
# The callback adds every calibration sample to a float64 reduction slot (callbacks/reduction.py), so a
# sample's own statistic must not depend on which other samples share its batch (that differs with the
# DDP world size).  Both functions work sample by sample in float32 (like Wanda and SparseGPT), which is
# 2x cheaper than float64; the slots are added in float64 at the end.

def _pairwise_sum_over_tokens(y: torch.Tensor) -> torch.Tensor:
    """[B, T, F] -> [B, F] by halving T: only elementwise adds, so every sample's result is bit-identical
    whatever the batch size, thread count or device (a library reduction may split differently)."""
    while y.shape[1] > 1:
        half = y.shape[1] // 2
        head = y[:, :half] + y[:, half:2 * half]
        y = torch.cat([head, y[:, 2 * half:]], dim=1) if y.shape[1] % 2 else head
    return y[:, 0]


def _weighted_rows_float32(x: torch.Tensor, row_weights: torch.Tensor | None) -> torch.Tensor:
    """x in float32 with each token's row scaled by its weight ([..., T, in] times [..., T])."""
    y = x.float()
    if row_weights is None:
        return y
    return y * row_weights.to(device=y.device, dtype=torch.float32).unsqueeze(-1)


def _check_batch(x: torch.Tensor, row_weights: torch.Tensor | None) -> None:
    if x.dim() != 3:
        raise ValueError(f"activations have shape {tuple(x.shape)}; pass them as [samples, tokens, in_features]")
    if row_weights is not None and tuple(row_weights.shape) != tuple(x.shape[:2]):
        raise ValueError(f"row_weights has shape {tuple(row_weights.shape)} for activations {tuple(x.shape)}; "
                         "give one weight per token, shape [samples, tokens]")


def sample_act_sq_sums(x: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, in] -> [B, in] float64: Σ_t (w_bt · x_btj)² for each sample b on its own."""
    _check_batch(x, row_weights)
    y = _weighted_rows_float32(x, row_weights)
    return _pairwise_sum_over_tokens(y * y).to(torch.float64)


def add_sample_hessian_(acc: torch.Tensor, x: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """acc += (w·x)ᵀ(w·x) for one sample's [T, in], in place in float32; returns acc.

    One GEMM of a fixed shape per sample, with the accumulator as its output (beta = 1): adding a separate
    per-sample [in, in] product would read and write in² values again, which costs more than the GEMM
    itself for a small model.  The sum is still exact across DDP world sizes as long as each accumulator
    sees the same samples in the same order (callbacks/reduction.py)."""
    if acc.dtype != torch.float32 or acc.shape != (x.shape[-1], x.shape[-1]):
        raise ValueError(f"accumulator {tuple(acc.shape)} {acc.dtype} does not fit activations {tuple(x.shape)}; "
                         "use a float32 [in_features, in_features] accumulator for this layer")
    y = _weighted_rows_float32(x, row_weights)
    return acc.addmm_(y.T, y)


# --- masks ---------------------------------------------------------------------------------------------

def parse_n_m(n_m) -> tuple[int, int] | None:
    """(N, M) from (2, 4) or "2:4"; None stays None."""
    if n_m is None:
        return None
    if isinstance(n_m, str):
        try:
            n_m = tuple(int(v) for v in n_m.split(":"))
        except ValueError:
            raise ValueError(f"n_m={n_m!r} is not of the form 'N:M'; use e.g. '2:4' or (2, 4)") from None
    if len(n_m) != 2:
        raise ValueError(f"n_m={n_m!r} must be a pair (N, M); use e.g. (2, 4) for 2 zeros per group of 4")
    n, m = int(n_m[0]), int(n_m[1])
    if not 0 < n < m:
        raise ValueError(f"n_m={n}:{m}: N must satisfy 0 < N < M (N zeros per group of M); use e.g. 2:4")
    return n, m


def _check_pattern(in_features: int, sparsity, n_m) -> tuple[float | None, tuple[int, int] | None]:
    n_m = parse_n_m(n_m)
    if n_m is None:
        if sparsity is None:
            raise ValueError("give either sparsity (e.g. 0.5) for unstructured pruning or n_m (e.g. (2, 4))")
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity={sparsity} must be in [0, 1); e.g. 0.5 prunes half of every row")
        return float(sparsity), None
    if sparsity is not None:
        raise ValueError(f"got both sparsity={sparsity} and n_m={n_m}; pass sparsity=None with n_m")
    if in_features % n_m[1]:
        raise ValueError(f"n_m={n_m[0]}:{n_m[1]} needs in_features divisible by {n_m[1]}, got {in_features}; "
                         "use unstructured sparsity for this layer or skip it")
    return None, n_m


def _lowest_in_groups(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the n lowest scores in every group of m consecutive columns; ties go to the earlier column.

    Ranks by m pairwise comparisons instead of sorting: same result as a stable sort, several times
    faster for the small groups N:M uses (SparseGPT calls this once per group).
    """
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // m, m)
    rank = torch.zeros(grouped.shape, dtype=torch.int32, device=scores.device)
    for k in range(m):
        other = grouped[..., k:k + 1]
        rank += other < grouped                                # strictly lower scores rank first
        rank[..., k + 1:] += other == grouped[..., k + 1:]     # an equal score earlier in the group too
    return (rank < n).reshape(rows, cols)


def _lowest_per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` lowest scores of every row; ties at the threshold go to the earlier columns.

    Same result as the first `count` of a stable sort, but kthvalue + cumsum is about twice as fast on
    CPU (SparseGPT calls this once per column block).
    """
    if count <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(scores, count, dim=1, keepdim=True).values
    below = scores < threshold
    at_threshold = scores == threshold
    still_needed = count - below.sum(dim=1, keepdim=True)
    return below | (at_threshold & (at_threshold.cumsum(dim=1) <= still_needed))


def select_mask(scores: torch.Tensor, sparsity: float | None = None, n_m=None) -> torch.Tensor:
    """Bool mask, True = prune.  Unstructured: the int(in * sparsity) lowest of each row; N:M: N lowest per M."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out_features, in_features], got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN/Inf; check the weight and the calibration statistics for NaN/Inf")
    sparsity, n_m = _check_pattern(scores.shape[1], sparsity, n_m)
    if n_m is not None:
        return _lowest_in_groups(scores, *n_m)
    return _lowest_per_row(scores, int(scores.shape[1] * sparsity))


def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the pruned weights in place (works on Parameters under no_grad); returns weight."""
    with torch.no_grad():
        weight.masked_fill_(mask, 0)
    return weight


# --- SparseGPT -----------------------------------------------------------------------------------------

def _inverse_cholesky_upper(hessian: torch.Tensor) -> torch.Tensor | None:
    """Upper-triangular U with U^T U = H^-1, or None if H is not numerically positive definite.

    SparseGPT's recipe is chol(H) -> cholesky_inverse -> chol(H^-1, upper).  The same U comes from one
    factorisation of H with its index order reversed: if flip(H) = L L^T then H^-1 = U^T U with
    U = flip(L^-1).  About the same flops, but H^-1 is never formed (no squared condition number) and
    there is a single factorisation that can fail, which the damping retry loop checks.
    """
    flipped = hessian.flip(0, 1)
    chol, info = torch.linalg.cholesky_ex(flipped)
    if int(info) != 0:
        return None
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    upper = chol_inv.flip(0, 1)
    if not torch.isfinite(upper).all() or not (upper.diagonal() > 0).all():
        return None
    return upper


def _retry_percdamp(percdamp: float, retry: int) -> float:
    """Damping for attempt `retry` (0 = first): 10x more each time; from 1e-3 up if percdamp is 0."""
    if percdamp > 0:
        return percdamp * 10 ** retry
    return 0.0 if retry == 0 else 1e-3 * 10 ** (retry - 1)


def _check_sparsegpt_args(weight, hessian, sparsity, n_m, blocksize, percdamp):
    """Validate SparseGPT's inputs; returns the checked (sparsity, n_m)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols}) for a weight with "
                         f"{cols} inputs; accumulate it from this layer's inputs")
    sparsity, n_m = _check_pattern(cols, sparsity, n_m)
    if blocksize < 1 or (n_m is not None and blocksize % n_m[1]):
        raise ValueError(f"blocksize={blocksize} must be a positive multiple of M={n_m[1] if n_m else 1} "
                         "so that N:M groups do not straddle blocks; use e.g. 128")
    if not percdamp >= 0:
        raise ValueError(f"percdamp={percdamp} must be >= 0; the usual value is 0.01")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN/Inf; SparseGPT needs a finite weight (check the checkpoint or earlier pruning)")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian contains NaN/Inf; check the calibration activations (fp16 overflow?) before pruning")
    if (hessian.diagonal() < 0).any():
        raise ValueError("hessian has negative diagonal entries, so it is not a sum of x x^T; pass the accumulated "
                         "accumulated Σ x xᵀ of this layer's inputs")
    return sparsity, n_m


def _damped_inverse_cholesky(hessian, mean_diag, percdamp: float, max_damp_retries: int):
    """Upper Cholesky factor of (H + damp·I)^-1, retrying with 10x the damping: (factor, percdamp used, retries)."""
    hinv_upper, used_percdamp = None, percdamp
    for retries in range(max_damp_retries + 1):
        used_percdamp = _retry_percdamp(percdamp, retries)
        damped = hessian.clone()
        damped.diagonal().add_(used_percdamp * mean_diag)
        hinv_upper = _inverse_cholesky_upper(damped)
        if hinv_upper is not None:
            return hinv_upper, used_percdamp, retries
    raise RuntimeError(
        f"SparseGPT: Cholesky of the Hessian failed even with percdamp={used_percdamp:g} after {max_damp_retries} "
        "10x retries; the Hessian is far from positive definite: check the calibration inputs or raise "
        "percdamp / max_damp_retries"
    )


def _solve_block(block, hinv_block, block_mask, start, end, sparsity, n_m, compute_dtype) -> torch.Tensor:
    """Prune one column block of W^T in place (mask chosen inside the solve) and return its scaled errors
    [block, out] for the lazy update of the columns after it."""
    hinv_diag = hinv_block.diagonal()
    errors = torch.empty_like(block)     # row i: the scaled error of input start+i, for the lazy update
    if n_m is None:
        saliency = (block * block) / (hinv_diag * hinv_diag).unsqueeze(1)
        count = int(end * sparsity) - int(start * sparsity)
        block_mask.copy_(_lowest_per_row(saliency.t().contiguous(), count).t())
        # err_i = (w_i - q_i) / d_i = w_i * mask_i / d_i: one multiply per column in the loop.
        err_scale = block_mask.to(compute_dtype) / hinv_diag.unsqueeze(1)
    n_group, m_group = n_m if n_m is not None else (0, 0)
    for i in range(end - start):
        if n_m is not None and i % m_group == 0:
            group = slice(i, i + m_group)
            saliency = (block[group] * block[group]) / (hinv_diag[group] * hinv_diag[group]).unsqueeze(1)
            block_mask[group] = _lowest_in_groups(saliency.t(), n_group, m_group).t()
            err_scale_group = block_mask[group].to(compute_dtype) / hinv_diag[group].unsqueeze(1)
        column_scale = err_scale[i] if n_m is None else err_scale_group[i % m_group]
        err = torch.mul(block[i], column_scale, out=errors[i])
        # OBS update of the not-yet-visited inputs of this block: w_j -= err * Hinv_ij (j > i).
        block[i + 1:].addr_(hinv_block[i, i + 1:], err, alpha=-1)
    block.masked_fill_(block_mask, 0)
    return errors


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None, n_m=None,
                    blocksize: int = 128, percdamp: float = 0.01, max_damp_retries: int = 3,
                    compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """SparseGPT (Frantar & Alistarh, 2023): prune W and update the survivors to keep W X close.

    hessian is Σ x x^T over calibration tokens ([in, in], any positive scale).  Returns (pruned weight in
    weight's dtype, bool mask with True = pruned, info: "percdamp" and absolute "damp" used, "retries" (a
    failed Cholesky is retried with 10x the damping), "dead_inputs" with H_ii = 0, the OBS "loss").

    The mask is chosen inside the solve, per column block, from the saliency w^2 / [H^-1]_ii^2 of the
    already-updated weights: unstructured prunes the same count from every row (cumulative
    int(cols_so_far * sparsity), so each row ends with exactly int(in * sparsity) zeros, the same
    per-row target as Wanda); N:M picks N of every M when the group is reached.  The reference's own solve (one
    threshold per column block over all rows) is pipeline/maths/reference.py's `fasterprune`.
    """
    sparsity, n_m = _check_sparsegpt_args(weight, hessian, sparsity, n_m, blocksize, percdamp)
    rows, cols = weight.shape

    # Work on W^T [in, out]: every per-column step below then reads and writes contiguous rows.
    weight_t = weight.detach().to(compute_dtype).t().contiguous()
    hessian = hessian.detach().to(weight.device)

    # Inputs that never fired carry no information: make H invertible there and drop those weights.
    dead = hessian.diagonal() == 0
    weight_t[dead] = 0
    # The solve is scale-free; dividing by the mean live diagonal first keeps a raw float64 sum over
    # many tokens from overflowing float32.
    hessian_scale = hessian.diagonal()[~dead].mean() if bool((~dead).any()) else torch.ones((), dtype=hessian.dtype)
    hessian = (hessian / hessian_scale).to(compute_dtype)
    hessian.diagonal()[dead] = 1
    mean_diag = hessian.diagonal().mean()
    hinv_upper, used_percdamp, retries = _damped_inverse_cholesky(hessian, mean_diag, percdamp, max_damp_retries)

    mask_t = torch.zeros(cols, rows, dtype=torch.bool, device=weight_t.device)
    loss = torch.zeros((), dtype=torch.float64, device=weight_t.device)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        errors = _solve_block(weight_t[start:end], hinv_upper[start:end, start:end], mask_t[start:end],
                              start, end, sparsity, n_m, compute_dtype)
        loss += (errors.double() ** 2).sum() / 2
        # Lazy batch update of everything after the block with the block's accumulated errors.
        if end < cols:
            weight_t[end:].addmm_(hinv_upper[start:end, end:].t(), errors, alpha=-1)

    pruned = weight_t.t().to(weight.dtype).contiguous()
    mask = mask_t.t().contiguous()
    info = {
        "percdamp": used_percdamp,
        "damp": float(used_percdamp * mean_diag * hessian_scale),  # in the units of the given hessian
        "retries": retries,
        "dead_inputs": int(dead.sum()),
        "loss": float(loss),
    }
    return pruned, mask, info
