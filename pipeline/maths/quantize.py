"""Weight-only quantization grids as pure tensor functions: symmetric int4 per group and FP8 (e4m3) per output channel.

A quantized layer is (codes, scales): the weight the model computes with is `dequantize(codes, scales)`, which is
`codes.to(scales.dtype) * scales` broadcast over each group, the very operation compressed-tensors' decompression runs,
so a saved folder and the in-memory model hold the same bits.  Zero maps to zero on both grids (symmetric int, and
FP8's exact 0), so pruned weights stay zero.

    scheme = Scheme.parse("w4a16", group_size=128)
    scales = group_scales(W, scheme)                      # [out, in / 128] in W's dtype
    codes = quantize_codes(W, scales, scheme)              # int8 in [-8, 7]
    W_q = dequantize(codes, scales, scheme)                # what the model runs with

GPTQ (pipeline/maths/gptq.py) picks the codes column by column with error feedback; `round_to_nearest` is the
calibration-free form (FP8's default).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("w4a16", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_available() -> bool:
    return hasattr(torch, "float8_e4m3fn")


@dataclass(frozen=True)
class Scheme:
    """One weight-only quantization format: "w4a16" (int4, symmetric, per group of `group_size` inputs) or "fp8"
    (float8_e4m3fn, one scale per output channel)."""
    name: str
    group_size: int | None = 128   # w4a16 only; None: one group per row (per channel)
    actorder: bool = False         # GPTQ visits columns by decreasing Hessian diagonal

    bits = property(lambda self: 4 if self.name == "w4a16" else 8)
    is_float = property(lambda self: self.name == "fp8")
    qmin = property(lambda self: -(2 ** (self.bits - 1)))
    qmax = property(lambda self: 2 ** (self.bits - 1) - 1)

    @classmethod
    def parse(cls, scheme: str | None = "w4a16", bits: int | None = None, group_size: int | None = 128,
              actorder: bool = False, field: str = "quantize") -> "Scheme":
        """Checked settings (one-line ValueError naming the field, the problem and the fix)."""
        if bits is not None and bits not in (4, 8):
            raise ValueError(f"{field} bits={bits}: only 4 (int4 GPTQ, scheme w4a16) and 8 (scheme fp8) are supported; "
                             "use bits: 4 or bits: 8")
        if scheme is None:
            scheme = "fp8" if bits == 8 else "w4a16"
        if scheme not in SCHEMES:
            raise ValueError(f"{field} scheme={scheme!r} is unknown; choose one of {', '.join(SCHEMES)}")
        if bits is not None and bits != (4 if scheme == "w4a16" else 8):
            raise ValueError(f"{field} bits={bits} disagrees with scheme={scheme} ({4 if scheme == 'w4a16' else 8} bits); "
                             "drop bits or set the matching scheme")
        if scheme == "fp8" and not fp8_available():
            raise ValueError(f"{field} scheme=fp8: this torch {torch.__version__} has no float8_e4m3fn; "
                             "install torch >= 2.1 or use scheme: w4a16")
        if scheme == "w4a16" and group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                                             or group_size < 1):
            raise ValueError(f"{field} group_size={group_size!r} must be a positive integer (default 128) or null (per channel)")
        return cls(scheme, group_size if scheme == "w4a16" else None, bool(actorder))

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def check_width(self, name: str, in_features: int, field: str = "quantize") -> None:
        if in_features % self.group_width(in_features):
            raise ValueError(f"{field} group_size={self.group_size}: {name} has {in_features} inputs, not a multiple of "
                             f"{self.group_size}; choose a group_size dividing every width (e.g. "
                             f"{_divisor(in_features, self.group_size)}) or group_size: null (one scale per output channel)")


def _divisor(width: int, group_size: int) -> int:
    """The largest power of two <= group_size dividing width (the group sizes kernels like)."""
    g = 1 << (group_size.bit_length() - 1)
    while width % g:
        g //= 2
    return g


def group_scales(weight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """[out, groups] scales in weight's dtype: absmax / 7.5 for int4 (GPTQ's and compressed-tensors' symmetric range
    [-8, 7]), absmax / 448 for FP8; an all-zero group gets scale 1 (its codes are 0 either way).  No scale is below the
    dtype's smallest normal number (a float16 group of weights under 3e-5 would otherwise get scale 0, and codes 0/0)."""
    rows, cols = weight.shape
    width = scheme.group_width(cols)
    absmax = weight.detach().float().abs().reshape(rows, cols // width, width).amax(-1)
    scales = (absmax / (FP8_MAX if scheme.is_float else (scheme.qmax - scheme.qmin) / 2)).clamp_min(torch.finfo(weight.dtype).tiny)
    return torch.where(absmax > 0, scales, torch.ones_like(scales)).to(weight.dtype)


def quantize_codes(weight: torch.Tensor, scales: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Codes of `weight` on the grid (int8 in [qmin, qmax], or float8_e4m3fn), computed in float32."""
    rows, cols = weight.shape
    width = scheme.group_width(cols)
    x = weight.float().reshape(rows, cols // width, width) / scales.float().unsqueeze(-1)
    if scheme.is_float:
        return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(rows, cols)
    return x.round().clamp(scheme.qmin, scheme.qmax).to(torch.int8).reshape(rows, cols)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """codes · scale in the scales' dtype, group by group (compressed-tensors' own decompression)."""
    rows, cols = codes.shape
    width = scheme.group_width(cols)
    return (codes.reshape(rows, cols // width, width).to(scales.dtype) * scales.unsqueeze(-1)).reshape(rows, cols)


def round_to_nearest(weight: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, dequantized weight) without calibration."""
    scales = group_scales(weight, scheme)
    return scales, dequantize(quantize_codes(weight, scales, scheme), scales, scheme)
