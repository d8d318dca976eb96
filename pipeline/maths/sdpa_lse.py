"""SDPA's output together with its row log-sum-exp: the aten op F.scaled_dot_product_attention itself would call.

    route = FusedSdpaRoute()
    out_and_lse = route.attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if out_and_lse is None: ...        # not here: call F.scaled_dot_product_attention and compute the lse yourself
    out, lse = out_and_lse             # out: F.sdpa's very bits; lse: [B, H_q, L] float32, natural log

F.scaled_dot_product_attention asks `torch._fused_sdp_choice` for a backend and calls one aten op, which computes the
row log-sum-exp anyway (flash, cuDNN, memory-efficient) and drops it.  Calling that op ourselves, with the same
arguments F.sdpa would give it (a bool mask turned into a float bias, the memory-efficient op's aligned mask), gives
both.  Whether the bits really are F.sdpa's is not assumed: the first call of each kind (see `call_kind`) runs both
F.sdpa and the op, compares the outputs with torch.equal and the log-sum-exp with one computed from q and k, and
keeps the verdict; only kinds found equal take the op from then on.  Any exception means "not here".
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# torch.nn.attention.SDPBackend's values, what torch._fused_sdp_choice returns
MATH, FLASH, EFFICIENT, CUDNN = 0, 1, 2, 3
BACKEND_NAMES = {MATH: "math", FLASH: "flash", EFFICIENT: "efficient", CUDNN: "cudnn"}
# The log-sum-exp a fused op returns may differ from the oracle's in the last bits of float32 (summation order);
# an error of d in lse_q scales row q's probabilities by exp(-d), so it becomes the mass's relative error one for one,
# and the mass must stay within 1e-5 of float64.
LSE_TOLERANCE = 8e-6
# the builtin (F.scaled_dot_product_attention unpatched): only it is known to dispatch as described here
SDPA = getattr(getattr(torch._C, "_nn", None), "scaled_dot_product_attention", None)


def call_kind(backend: int, query, key, attn_mask, is_causal: bool) -> tuple:
    """What may decide whether the op's bits are F.sdpa's: the backend, device, dtype, causal flag, the shapes of
    q, k and the mask (a library may pick its kernel by shape: a calibration's windows share one shape, so this costs
    one verification per shape) and their memory layouts (contiguous or not), the mask's dtype."""
    mask = None if attn_mask is None else (str(attn_mask.dtype), tuple(attn_mask.shape), attn_mask.is_contiguous())
    return (backend, str(query.device), str(query.dtype), bool(is_causal), tuple(query.shape), tuple(key.shape),
            query.is_contiguous(), key.is_contiguous(), mask)


def route(backend: int | None, eligible: bool, verdict: bool | None) -> str:
    """"fused" (the op gives output and lse), "verify" (run both, compare, remember) or "separate" (F.sdpa alone).

    backend: _fused_sdp_choice's answer (None when it failed); eligible: the call qualifies at all (the builtin
    F.sdpa, no dropout, no autograd, 4-d tensors); verdict: the remembered comparison for this call's kind."""
    if not eligible or backend not in (FLASH, EFFICIENT, CUDNN):
        return "separate"
    if verdict is None:
        return "verify"
    return "fused" if verdict else "separate"


def _float_bias(attn_mask, dtype, fill):
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    zero = torch.zeros((), dtype=dtype, device=attn_mask.device)
    return torch.where(attn_mask.logical_not(), torch.tensor(fill, dtype=dtype, device=attn_mask.device), zero)


def _aligned_for_efficient(bias, query, key):
    """The memory-efficient op's mask as F.sdpa passes it: every stride but the last a multiple of 8 (else padded
    and sliced back), expanded to [B, H, L, S]."""
    aligned = bias.stride(-1) == 1 and all(s % 8 == 0 for s in bias.stride()[:-1])
    if not aligned:
        size = bias.shape[-1]
        bias = F.pad(bias, (0, 8 - size % 8))[..., :size]
    return bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])


def aten_attention_with_lse(backend, query, key, value, attn_mask, dropout_p, is_causal, scale, fill):
    """(output, [B, H_q, L] float32 natural-log lse) from the aten op of `backend`; fill: what a bool mask's False
    becomes in the bias (F.sdpa: -inf, or a finite -65504 for cuDNN in some torch versions)."""
    aten = torch.ops.aten
    length = query.shape[-2]
    if backend == FLASH and query.is_cuda:
        if attn_mask is not None:
            raise ValueError("the flash op takes no mask")
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        out, lse = aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                            scale=scale)[:2]
    elif backend == FLASH:  # CPU flash (Triton's interpreter runs the tests on CPU tensors)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=_float_bias(attn_mask, query.dtype, fill),
            scale=scale)[:2]
    elif backend == EFFICIENT:
        bias = _float_bias(attn_mask, query.dtype, fill)
        bias = None if bias is None else _aligned_for_efficient(bias, query, key)
        out, lse = aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, dropout_p, is_causal,
                                                                scale=scale)[:2]
    elif backend == CUDNN:
        out, lse = aten._scaled_dot_product_cudnn_attention(query, key, value, _float_bias(attn_mask, query.dtype, fill),
                                                            True, dropout_p, is_causal, False, scale=scale)[:2]
    else:
        raise ValueError(f"no aten op with a log-sum-exp for backend {backend}")
    lse = lse.reshape(lse.shape[0], lse.shape[1], -1)[..., :length]  # cuDNN: [B, H, L, 1]; efficient: L padded
    if tuple(lse.shape) != (query.shape[0], query.shape[1], length):
        raise ValueError(f"unexpected log-sum-exp shape {tuple(lse.shape)}")
    return out, lse.float()


def lse_matches(lse: torch.Tensor, oracle: torch.Tensor) -> tuple[bool, float]:
    """(close enough, largest difference) on the rows with allowed keys (oracle finite); a fully masked row's lse
    does not matter (all its scores are -inf: exp(-inf - anything finite) = 0) but must not be NaN."""
    finite = oracle.isfinite()
    if not bool(finite.any()):
        return False, float("nan")
    difference = (lse[finite] - oracle[finite]).abs()
    largest = float(difference.max())
    return largest <= LSE_TOLERANCE and not bool(lse.isnan().any()), largest


class FusedSdpaRoute:
    """The verdict cache of one process: call kind -> equal (bool), plus what was seen, for benchmarks' reports."""

    def __init__(self):
        self.verdicts: dict[tuple, bool] = {}
        self.fills: dict[tuple, float] = {}
        self.units: dict[tuple, float] = {}  # what turns the op's lse into natural log (1, or ln 2 for log2 units)
        self.reports: dict[str, dict] = {}

    def attention(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, *, oracle_lse):
        """(output, lse, backend name) by the fused op where this kind was verified, else None (the caller then calls
        F.sdpa).  oracle_lse(query, key, attn_mask, is_causal, scale) -> [B, H_q, L] computes the lse independently;
        it runs once per kind."""
        try:
            eligible = (query.dim() == 4 and key.dim() == 4 and value.dim() == 4 and not dropout_p
                        and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                                              or value.requires_grad)))
            backend = torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa) if eligible else None
            kind = call_kind(backend, query, key, attn_mask, is_causal) if eligible else None
            step = route(backend, eligible, self.verdicts.get(kind))
            if step == "separate":
                return None
            if step == "verify":
                return self._verify(kind, backend, query, key, value, attn_mask, dropout_p, is_causal, scale,
                                    enable_gqa, oracle_lse)
            out, lse = aten_attention_with_lse(backend, query, key, value, attn_mask, dropout_p, is_causal, scale,
                                               self.fills[kind])
            return out, lse * self.units[kind] if self.units[kind] != 1.0 else lse, BACKEND_NAMES[backend]
        except Exception:  # noqa: BLE001  (any surprise: F.sdpa and the separate lse, as without this route)
            return None

    def _verify(self, kind, backend, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                oracle_lse):
        self.verdicts[kind] = False  # until proven: an exception below leaves the separate path for this kind
        report = {"backend": BACKEND_NAMES[backend], "same_output_bits": False, "lse_max_abs_diff": None}
        self.reports[repr(kind)] = report
        expected = SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
        fills = (float("-inf"), -65504.0) if attn_mask is not None and attn_mask.dtype == torch.bool else (0.0,)
        for fill in fills:
            out, lse = aten_attention_with_lse(backend, query, key, value, attn_mask, dropout_p, is_causal, scale, fill)
            if torch.equal(out, expected):
                report.update(same_output_bits=True, bool_mask_fill=fill)
                break
        else:
            return None
        oracle = oracle_lse(query, key, attn_mask, is_causal, scale)
        for unit in (1.0, math.log(2.0)):  # natural log as documented, or log2 units
            close, largest = lse_matches(lse * unit, oracle)
            if unit == 1.0:
                report["lse_max_abs_diff"] = largest
            if close:
                report.update(lse_max_abs_diff=largest, lse_unit="natural" if unit == 1.0 else "log2")
                self.verdicts[kind], self.fills[kind], self.units[kind] = True, fill, unit
                return expected, lse * unit, BACKEND_NAMES[backend]
        return None
