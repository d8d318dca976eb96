"""Attention mass as two Triton passes over key blocks: no [T_q, T_k] matrix, fp32 accumulation.

    mass = attention_mass_triton(q, k, mask, is_causal, scale, query_weights=w)   # [B, S] float32

The mass of key j is Σ_heads Σ_q w_q · softmax(q·kᵀ·scale + mask)[q, j] = Σ_heads Σ_q w_q · exp(s_qj − lse_q),
with lse_q the row's log-sum-exp.  Pass (a) computes lse_q per (batch, head, query) with an online max/sum over
key blocks (the flash-attention recurrence); pass (b) gives each program one key block of one query head and sums
exp(s − lse) · w over the query blocks.  Each query head writes its own row of a [B, H_q, S] buffer, summed over
heads in a fixed order afterwards: no atomics, so the same input gives the same bits on every run.

Semantics are those of pipeline.maths.attention.attention_mass (and of SDPA): scale defaults to 1/sqrt(D); a bool
mask marks allowed pairs, a float mask is added to the scores; masks broadcast from the right and are read with
their own strides (stride 0 on broadcast dims: a [B, 1, 1, S] padding mask and a [B, 1, L, S] block-causal mask
are never expanded in memory); is_causal is top-left aligned; query head h reads key head h // (H_q / H_kv), the
query heads sharing a key head are summed; a row whose keys are all masked contributes 0; NaN in q or k gives NaN.

Needs a CUDA tensor and triton (or, for the tests, Triton's interpreter: TRITON_INTERPRET=1 when this module is
imported, then CPU tensors run).  `unsupported(q, k)` names what rules the kernel out; callers then keep the
chunked path.  This module imports without triton (AVAILABLE is False then).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS or a CPU-only install: the probe keeps its chunked path
    triton = tl = None

AVAILABLE = triton is not None
# kernels then run on CPU tensors (slowly); triton < 3.4 has no `knobs` and reads the variable itself
INTERPRETED = AVAILABLE and (bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs")
                             else os.environ.get("TRITON_INTERPRET", "0") == "1")
# Raised at launch when a tile does not fit this GPU's shared memory or registers (e.g. float32 at head dim 256 on a
# 99 KiB consumer card); the probe then takes the chunked path for that call.
OutOfResources = triton.runtime.errors.OutOfResources if AVAILABLE else type("OutOfResources", (Exception,), {})

# Block sizes and launch settings for Hopper-class GPUs at head dim 128 (benchmarks/mass_kernel_cuda.py compares).
DEFAULT_CONFIG = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 2}
# float32 inputs take three TF32 products per dot (tf32x3: float32-grade, on tensor cores; a plain IEEE dot runs on
# FMA units and spills); their tiles are twice the bytes, so smaller blocks keep shared memory under Hopper's 227 KiB.
FLOAT32_CONFIG = {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 1}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NO_MASK, _BOOL_MASK, _ADDITIVE_MASK = 0, 1, 2


def _jit(fn):
    return triton.jit(fn) if AVAILABLE else fn


def _interpreter_reads_one_element_arrays() -> None:
    """triton <= 3.6's interpreter turns a 1-element array into a Python int with int(array), which numpy >= 2.4
    refuses, so runtime loop bounds fail (triton-lang/triton#9171; fixed upstream by reading the element)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "reads_one_element", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.reads_one_element = True
    interpreter._patch_lang_tensor = patched


if INTERPRETED:
    _interpreter_reads_one_element_arrays()


@_jit
def _masked_scores(s, mask_ptrs, inside, query_index, key_index, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   MASK_FACTOR: tl.constexpr = 1.0):
    """Scores with SDPA's masks applied: -inf where a bool mask forbids, plus a float mask (times MASK_FACTOR, for
    scores kept in log2 units), -inf above the causal diagonal (top-left aligned).  query_index / key_index
    broadcast to s's shape."""
    if MASK_KIND == 1:
        s = tl.where(tl.load(mask_ptrs, mask=inside, other=0) != 0, s, float("-inf"))
    if MASK_KIND == 2:
        s += tl.load(mask_ptrs, mask=inside, other=0.0).to(tl.float32) * MASK_FACTOR
    if IS_CAUSAL:
        s = tl.where(key_index <= query_index, s, float("-inf"))
    return s


@_jit
def _row_logsumexp_kernel(
    q_ptr, k_ptr, mask_ptr, lse_ptr,
    q_stride_b, q_stride_h, q_stride_l, q_stride_d,
    k_stride_b, k_stride_h, k_stride_s, k_stride_d,
    m_stride_b, m_stride_h, m_stride_l, m_stride_s,
    q_heads, groups, q_len, k_len, scale,
    MASK_KIND: tl.constexpr, PRECISION: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """lse[b·H_q + h, i] = log Σ_j exp(s_ij) over the allowed keys (natural log; -inf for a fully masked row)."""
    head = tl.program_id(0).to(tl.int64)  # 64-bit offsets: batch · stride may pass 2^31
    batch, q_head = head // q_heads, head % q_heads
    kv_head = q_head // groups
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + batch * q_stride_b + q_head * q_stride_h + rows[:, None] * q_stride_l
                + dims[None, :] * q_stride_d, mask=rows[:, None] < q_len, other=0.0)  # [M, D]
    k_base = k_ptr + batch * k_stride_b + kv_head * k_stride_h
    m_base = mask_ptr + batch * m_stride_b + q_head * m_stride_h + rows[:, None] * m_stride_l

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    key_end = k_len
    if IS_CAUSAL:  # query i sees keys j <= i: the blocks past this query block's last row hold nothing
        key_end = tl.minimum(k_len, (tl.program_id(1) + 1) * BLOCK_M)
    for start in range(0, key_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + cols[None, :] * k_stride_s + dims[:, None] * k_stride_d,
                    mask=cols[None, :] < k_len, other=0.0)  # [D, N]: kᵀ
        s = tl.dot(q, k, input_precision=PRECISION) * scale  # [M, N]
        s = _masked_scores(s, m_base + cols[None, :] * m_stride_s, (rows[:, None] < q_len) & (cols[None, :] < k_len),
                           rows[:, None], cols[None, :], MASK_KIND, IS_CAUSAL)
        s = tl.where(cols[None, :] < k_len, s, float("-inf"))  # keys past the end
        new_max = tl.maximum(row_max, tl.max(s, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # all masked so far: exp(-inf - 0) = 0, not NaN
        # exp(x - c) as exp2(x·log2(e) - c·log2(e)): one fused multiply-add per score ahead of the exp2
        row_sum = row_sum * tl.exp2((row_max - shift) * 1.4426950408889634) \
            + tl.sum(tl.exp2(s * 1.4426950408889634 - (shift * 1.4426950408889634)[:, None]), 1)
        row_max = new_max
    # A NaN score makes row_sum NaN (exp(NaN) = NaN) even where the GPU's max skipped it (max(NaN, -inf) = -inf), so
    # "fully masked" is row_sum == 0, never row_max == -inf: NaN goes on to the mass, not a silent zero.
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    lse = tl.where(row_sum == 0.0, float("-inf"), shift + tl.log(row_sum))
    tl.store(lse_ptr + head * q_len + rows, lse, mask=rows < q_len)


@_jit
def _key_mass_kernel(
    q_ptr, k_ptr, mask_ptr, lse_ptr, weight_ptr, out_ptr,
    q_stride_b, q_stride_h, q_stride_l, q_stride_d,
    k_stride_b, k_stride_h, k_stride_s, k_stride_d,
    m_stride_b, m_stride_h, m_stride_l, m_stride_s,
    q_heads, groups, q_len, k_len, scale,
    MASK_KIND: tl.constexpr, PRECISION: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """out[b·H_q + h, j] = Σ_i w_i · exp(s_ij − lse_i) for the keys j of this program's block.

    Scores are computed transposed, keys by queries (k · qᵀ), so that the sum over queries runs along rows: within
    a warp's lanes, with one [BLOCK_N] accumulator, rather than across warps or in a second [N, M] tile.  The pass
    is bound by its exponentials (one per score, as many as the attention forward's), so each score costs as few
    other operations as possible: scores in log2 units straight from the dot (scale · log2(e) in one multiply), and
    a row with no allowed key (or past the end) gets lse = +inf, so exp2(s − lse) is 0 there without a select."""
    head = tl.program_id(0).to(tl.int64)  # 64-bit offsets: batch · stride may pass 2^31
    batch, q_head = head // q_heads, head % q_heads
    kv_head = q_head // groups
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    k = tl.load(k_ptr + batch * k_stride_b + kv_head * k_stride_h + cols[:, None] * k_stride_s
                + dims[None, :] * k_stride_d, mask=cols[:, None] < k_len, other=0.0)  # [N, D]
    q_base = q_ptr + batch * q_stride_b + q_head * q_stride_h
    m_base = mask_ptr + batch * m_stride_b + q_head * m_stride_h + cols[:, None] * m_stride_s

    mass = tl.zeros([BLOCK_N], tl.float32)
    query_start = 0
    if IS_CAUSAL:  # key j is seen by queries i >= j only
        query_start = (tl.program_id(1) * BLOCK_N // BLOCK_M) * BLOCK_M
    scale_log2 = scale * 1.4426950408889634
    for start in range(query_start, q_len, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = tl.load(q_base + rows[:, None] * q_stride_l + dims[None, :] * q_stride_d,
                    mask=rows[:, None] < q_len, other=0.0)  # [M, D], rows contiguous as stored
        lse = tl.load(lse_ptr + head * q_len + rows, mask=rows < q_len, other=float("-inf"))
        # fully masked rows (lse = -inf), and rows past the end: +inf, so that they give exp2(s - inf) = 0
        lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2  # [N, M], log2 units
        s = _masked_scores(s, m_base + rows[None, :] * m_stride_l, (cols[:, None] < k_len) & (rows[None, :] < q_len),
                           rows[None, :], cols[:, None], MASK_KIND, IS_CAUSAL, 1.4426950408889634)
        p = tl.exp2(s - lse_log2[None, :])
        if HAS_WEIGHTS:
            p = p * tl.load(weight_ptr + batch * q_len + rows, mask=rows < q_len, other=0.0)[None, :]
        mass += tl.sum(p, 1)
    tl.store(out_ptr + head * k_len + cols, mass, mask=cols < k_len)


def unsupported(query: torch.Tensor, key: torch.Tensor) -> str | None:
    """Why the kernel cannot take these [B, H, L, D] / [B, H_kv, S, D] inputs, or None when it can."""
    if not AVAILABLE:
        return "triton is not installed"
    if not (query.is_cuda or INTERPRETED):
        return f"the tensors are on {query.device}, not on a CUDA device"
    if query.dtype != key.dtype or query.dtype not in _DTYPES:
        return f"query/key dtypes {query.dtype}/{key.dtype} are not one of float16, bfloat16, float32 (both alike)"
    head_dim = query.shape[-1]
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return f"head dim {head_dim} is not a power of 2 in [16, 256]"
    return None


def attention_mass_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    query_weights: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    row_logsumexp: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, S] float32 mass of [B, H_q, L, D] queries over [B, H_kv, S, D] keys.

    attn_mask: None, or a bool / float tensor broadcastable to [B, H_q, L, S] with 4 dims (SDPA's rule).
    query_weights: None or [B, L].  block_m / block_n / num_warps / num_stages default to DEFAULT_CONFIG
    (FLOAT32_CONFIG for float32 inputs).
    row_logsumexp: [B, H_q, L] natural-log row log-sum-exp of these very scores (e.g. what a flash-attention
    forward returns) to skip the first pass; None computes it."""
    launch = _Launch(query, key, attn_mask, scale, block_m, block_n, num_warps, num_stages)
    if launch.empty:  # nothing to launch: no key receives anything
        return torch.zeros(launch.batch, launch.k_len, dtype=torch.float32, device=query.device)
    if row_logsumexp is None:
        lse = launch.row_logsumexp(is_causal)
    else:
        lse = row_logsumexp.to(device=query.device, dtype=torch.float32).reshape(-1, launch.q_len).contiguous()
    return launch.key_mass(lse, is_causal, query_weights)


def row_logsumexp_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    **config,
) -> torch.Tensor:
    """[B, H_q, L] float32 natural-log log-sum-exp of each query's scores (pass 1 alone; -inf for a fully masked
    row).  Same arguments as attention_mass_triton."""
    launch = _Launch(query, key, attn_mask, scale, *(config.get(n) for n in ("block_m", "block_n", "num_warps",
                                                                             "num_stages")))
    if launch.empty:
        return torch.full((launch.batch, launch.q_heads, launch.q_len), float("-inf"), device=query.device)
    return launch.row_logsumexp(is_causal).reshape(launch.batch, launch.q_heads, launch.q_len)


class _Launch:
    """The arguments both passes share: checked shapes, the mask as a strided view, the launch config."""

    def __init__(self, query, key, attn_mask, scale, block_m, block_n, num_warps, num_stages):
        reason = unsupported(query, key)
        if reason is not None:
            raise ValueError(f"attention_mass_triton: {reason}; use pipeline.maths.attention.attention_mass")
        batch, q_heads, q_len, head_dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        if q_heads % kv_heads:
            raise ValueError(f"query heads ({q_heads}) must be a multiple of key heads ({kv_heads}) for GQA")
        config = dict(FLOAT32_CONFIG if query.dtype == torch.float32 else DEFAULT_CONFIG)
        config.update({n: v for n, v in (("block_m", block_m), ("block_n", block_n), ("num_warps", num_warps),
                                          ("num_stages", num_stages)) if v is not None})
        self.query, self.key, self.config, self.head_dim = query, key, config, head_dim
        self.batch, self.q_heads, self.q_len, self.k_len = batch, q_heads, q_len, k_len
        self.device = device = query.device
        self.empty = batch * q_heads * q_len * k_len == 0
        scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        if attn_mask is None:
            self.mask_kind, self.mask, mask_strides = _NO_MASK, query, (0, 0, 0, 0)  # never read
        else:
            if attn_mask.dim() != 4:
                raise ValueError(f"attn_mask must have 4 dims here, got shape {tuple(attn_mask.shape)}")
            mask = attn_mask.to(device).expand(batch, q_heads, q_len, k_len)  # a view: broadcast dims get stride 0
            if mask.dtype == torch.bool:
                self.mask_kind, self.mask = _BOOL_MASK, mask.view(torch.uint8)
            else:
                self.mask_kind, self.mask = _ADDITIVE_MASK, mask
            mask_strides = self.mask.stride()
        self.common = (*query.stride(), *key.stride(), *mask_strides, q_heads, q_heads // kv_heads, q_len, k_len,
                       scale)
        # float32: split products (one TF32 product would cost ~1e-3); halves: tensor cores, exact products anyway
        precision = "tf32x3" if query.dtype == torch.float32 else "tf32"
        self.launch = {"num_warps": config["num_warps"], "num_stages": config["num_stages"], "PRECISION": precision,
                       "BLOCK_M": config["block_m"], "BLOCK_N": config["block_n"], "HEAD_DIM": head_dim}

    def _on_device(self):
        # Triton launches on the current CUDA device: make it the tensors' one (a model spread over GPUs by device_map)
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def row_logsumexp(self, is_causal) -> torch.Tensor:
        lse = torch.empty(self.batch * self.q_heads, self.q_len, dtype=torch.float32, device=self.device)
        with self._on_device():
            _row_logsumexp_kernel[(self.batch * self.q_heads, triton.cdiv(self.q_len, self.config["block_m"]))](
                self.query, self.key, self.mask, lse, *self.common, MASK_KIND=self.mask_kind,
                IS_CAUSAL=bool(is_causal), **self.launch)
        return lse

    def key_mass(self, lse, is_causal, query_weights) -> torch.Tensor:
        weights = self.query
        if query_weights is not None:
            weights = query_weights.to(device=self.device, dtype=torch.float32).reshape(self.batch, self.q_len)
            weights = weights.contiguous()
        per_head = torch.empty(self.batch, self.q_heads, self.k_len, dtype=torch.float32, device=self.device)
        with self._on_device():
            _key_mass_kernel[(self.batch * self.q_heads, triton.cdiv(self.k_len, self.config["block_n"]))](
                self.query, self.key, self.mask, lse, weights, per_head, *self.common, MASK_KIND=self.mask_kind,
                IS_CAUSAL=bool(is_causal), HAS_WEIGHTS=query_weights is not None, **self.launch)
        return per_head.sum(dim=1)  # heads in a fixed order: deterministic
