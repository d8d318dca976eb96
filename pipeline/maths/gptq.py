"""GPTQ (Frantar et al., 2023) weight-only quantization, joint with a pruning mask, as a pure tensor function.

    H = Σ x xᵀ over calibration tokens (rows weighted by 1 − sink score when sink-aware; the SparseGPT statistic)
    W_q, scales, info = gptq_quantize(W, H, Scheme.parse("w4a16"), mask=pruned)

Columns are quantized one at a time; each column's rounding error is spread onto the columns not yet visited through
the inverse Hessian (lazily, per block of `blocksize` columns, as SparseGPT).  Pruned weights (mask True) end exactly
zero.  joint="obs" (default) treats a pruned weight as quantized to zero when its column is reached: the error feedback
it received on the way is passed on to the columns after it, as SparseGPT's joint pruning and quantization does.
joint="mask" drops that feedback instead (the update never lands on a pruned weight).  Both give exact zeros; "obs"
leaves a slightly smaller layer-output error (docs/quantize.md).  A group's scale is taken with its pruned entries at
zero, and zero quantizes to zero.

Groups are contiguous runs of `group_size` inputs in the weight's own order, which is what compressed-tensors'
pack-quantized format and the serving engines read (no g_idx).  Without act-order a group's scale comes from its
error-updated weights when the solve reaches it (GPTQ's default); with act-order the columns are visited by decreasing
Hessian diagonal and every group's scale is fixed from the masked weight before the solve (GPTQ's static groups,
llm-compressor's actorder="weight").
"""
from __future__ import annotations

import torch

from pipeline.maths.quantize import Scheme, dequantize, group_scales
from pipeline.maths.sparsity import _damped_inverse_cholesky


def _check(weight, hessian, mask, scheme: Scheme):
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols}); accumulate it from this layer's inputs")
    if mask is not None and mask.shape != weight.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(weight.shape)} (True = pruned)")
    if not (torch.isfinite(weight).all() and torch.isfinite(hessian).all()):
        raise ValueError("weight or hessian contains NaN/Inf; check the checkpoint and the calibration activations")
    scheme.check_width("layer", cols)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, mask: torch.Tensor | None = None,
                  blocksize: int = 128, percdamp: float = 0.01, max_damp_retries: int = 3, joint: str = "obs"
                  ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(dequantized weight in weight's dtype, scales [out, groups] in weight's dtype, info).

    info: "percdamp" used, "retries", "dead_inputs" (H_ii = 0: those weights are set to zero), the OBS "loss"
    Σ err² / 2 in the units of the normalised Hessian."""
    _check(weight, hessian, mask, scheme)
    if joint not in ("obs", "mask"):
        raise ValueError(f"joint={joint!r}: use 'obs' (a pruned weight quantizes to zero, its error passed on) or 'mask'")
    rows, cols = weight.shape
    width = scheme.group_width(cols)
    w = weight.detach().float().t().contiguous()           # W^T [in, out]: each column step reads a contiguous row
    keep = None if mask is None else (~mask.to(w.device, torch.bool)).t().contiguous()
    if keep is not None:
        w.mul_(keep)
    hessian = hessian.detach().to(w.device)
    dead = hessian.diagonal() == 0
    w[dead] = 0
    scale_h = hessian.diagonal()[~dead].mean() if bool((~dead).any()) else torch.ones((), dtype=hessian.dtype)
    h = (hessian / scale_h).float()
    h.diagonal()[dead] = 1

    static = scheme.actorder
    scales = group_scales(w.t(), scheme) if static else torch.empty(rows, cols // width, dtype=weight.dtype, device=w.device)
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if scheme.actorder else None
    if order is not None:
        w, h = w[order], h[order][:, order]
        keep = None if keep is None else keep[order]
    group_of = (order if order is not None else torch.arange(cols, device=w.device)) // width  # column -> its group

    hinv, used, retries = _damped_inverse_cholesky(h, h.diagonal().mean(), percdamp, max_damp_retries)
    scales_f = scales.float()
    groups = group_of.tolist()
    codes = torch.empty(cols, rows, dtype=torch.float32, device=w.device)  # the grid values, in visiting order
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block, hblock = w[start:end], hinv[start:end, start:end]
        errors = torch.empty_like(block)
        for i in range(end - start):
            col = start + i
            if not static and col % width == 0:              # a group's scale once the solve reaches it
                group = w[col:col + width] if keep is None else w[col:col + width] * keep[col:col + width]
                scales[:, col // width] = group_scales(group.t(), scheme).squeeze(1)
                scales_f[:, col // width] = scales[:, col // width].float()
            scale = scales_f[:, groups[col]]
            if keep is not None and joint == "mask":
                block[i].mul_(keep[col])                     # the feedback that reached a pruned weight is dropped
            q = _round(block[i] / scale, scheme)
            if keep is not None:
                q.mul_(keep[col])                            # a pruned weight is "quantized" to zero
            codes[col] = q
            torch.div(block[i] - q * scale, hblock[i, i], out=errors[i])
            # (addmm_ with a rank-1 product: torch's CPU addr_ is ~1000x slower at a few thousand columns)
            block[i + 1:].addmm_(hblock[i, i + 1:, None], errors[i:i + 1], alpha=-1)
        loss += (errors.double() ** 2).sum() / 2
        if end < cols:
            w[end:].addmm_(hinv[start:end, end:].t(), errors, alpha=-1)

    if order is not None:
        codes = codes[torch.argsort(order)]
    codes = codes.t()
    if keep is not None and bool((codes[mask.to(codes.device, torch.bool)] != 0).any()):
        raise AssertionError("gptq_quantize: a pruned weight got a nonzero code")
    grid = codes.to(torch.float8_e4m3fn) if scheme.is_float else codes.to(torch.int8)
    info = {"percdamp": used, "retries": retries, "dead_inputs": int(dead.sum()), "loss": float(loss)}
    return dequantize(grid, scales, scheme).contiguous(), scales, info


def _round(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """x (already divided by its scale) on the grid, as float32."""
    if scheme.is_float:
        return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
    return x.round().clamp(scheme.qmin, scheme.qmax)
