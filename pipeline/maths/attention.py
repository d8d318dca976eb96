"""Attention mass: how much softmax attention each key position receives, read off a model's forward.

    with AttentionMassProbe(per_layer=True) as probe:
        model(input_ids=ids)
    probe.require_attention()          # clear error if the model's attention never reached the probe
    probe.mass                         # [B, T_k] float32: Σ over layers, heads and queries of softmax(q·kᵀ)
    probe.per_layer                    # [B, T_k] per attention call, in call order

How it sees attention: while active, the probe replaces `torch.nn.functional.scaled_dot_product_attention`
(SDPA) with a wrapper that first calls the original function (so the model's outputs are bit-for-bit what
they would have been) and then, under no_grad and in float32, recomputes the attention probabilities from
the same q, k, mask, causal flag, scale and GQA layout, chunked over queries so that no [T_q, T_k] matrix
for all queries is ever held at once (peak O(B·H·chunk·T_k) instead of O(B·H·T_q·T_k)).  On a CUDA device with
triton installed, the same mass comes from two fused Triton passes instead (pipeline/maths/attention_triton.py: the
row log-sum-exp, then Σ_q exp(q·k − lse) per key block), unless the probe keeps the reference's order; where the
probe wraps torch's own SDPA, the output and the log-sum-exp come from one call of the aten op SDPA dispatches to
(flash / cuDNN / memory-efficient: pipeline/maths/sdpa_lse.py), used only for kinds of call verified once to give
SDPA's very bits, so only the second pass runs.  CPU runs
(Triton's interpreter aside, TRITON_INTERPRET=1 as in the tests) and the reference flavour take the chunked /
reference paths, so their bits never depend on the kernel.  docs/mass_kernel.md.

What is covered, and what is not:
  * any code that looks SDPA up as `torch.nn.functional.scaled_dot_product_attention` / `F.scaled_...`
    at call time: BERT (`attn_implementation="sdpa"`), the LLaDA / Dream remote code, and every native
    transformers model whose `attn_implementation="sdpa"` goes through the `AttentionInterface` registry
    (`ALL_ATTENTION_FUNCTIONS["sdpa"]` is `integrations.sdpa_attention.sdpa_attention_forward`, which ends
    in that very call). So the registry needs no patch of its own for "sdpa".
  * NOT covered: "eager" (a module-local softmax, never in the registry), "flash_attention_2/3",
    "flex_attention", paged/kernel-hub entries and any code that bound the function early
    (`from torch.nn.functional import scaled_dot_product_attention` at import time). Those forwards run
    untouched and the probe sees zero calls; `require_attention()` then raises NoAttentionSeenError rather
    than returning an all-zero mass. Load such models with attn_implementation="sdpa".
  * torch.compile: while a probe is active, torch.compile's stance is "force_eager" (torch >= 2.6), so every
    compiled function or module runs its Python eagerly and its SDPA call reaches the probe: LLaDA's remote
    code, whose module-level `@torch.compile()` wrapper calls F.scaled_dot_product_attention, and whole
    models wrapped in torch.compile alike.  Dynamo never traces the probe: no graph break, no guard on the
    patched function or on the probe's state, no recompile, no compile of a probed forward; code compiled
    before stays cached and runs again once the probe exits (tests/test_compile_safe.py).  The stance is
    process-wide: other threads' compiled code also runs eagerly (correct, slower) while a probe is active.
  * The mass is that of the probabilities before dropout (dropout_p is ignored); calibration runs in eval.
  * Only calls from the thread that entered the probe are measured; other threads pass straight through.

Probes nest: an inner probe wraps whatever function is installed (possibly an outer probe), so both see
every call; exits must be in LIFO order (a `with` block guarantees it), otherwise RuntimeError.
"""
from __future__ import annotations

import inspect
import math
import threading

import torch
import torch.nn.functional as F

from pipeline.maths import attention_triton, reference, sdpa_lse

# Cap on one chunk's float32 score tensor; chunk_size is lowered to fit it for huge B·H·T_k.
DEFAULT_CHUNK_BYTES = 64 << 20
# How AttentionMassProbe computes each call's mass: "auto" = the Triton kernel wherever it runs (CUDA tensors,
# triton installed, head dim a power of 2 in [16, 256]), else chunked; "triton" insists; "chunked" never uses it.
MASS_KERNELS = ("auto", "triton", "chunked")

# Which kinds of SDPA call give F.sdpa's very output together with its log-sum-exp (pipeline/maths/sdpa_lse.py):
# verified once per kind and process, so that the probe's output never depends on it.  FUSED_SDPA.reports says why.
FUSED_SDPA = sdpa_lse.FusedSdpaRoute()

_SDPA_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        for name, default in (
            ("query", inspect.Parameter.empty), ("key", inspect.Parameter.empty), ("value", inspect.Parameter.empty),
            ("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False), ("scale", None),
        )
    ]
    + [inspect.Parameter("enable_gqa", inspect.Parameter.KEYWORD_ONLY, default=False)]
)


def _force_eager():
    """Enter torch.compile's "force_eager" stance (torch >= 2.6) and return its context, or None.

    Under it every torch.compile'd function or module runs its Python eagerly: dynamo traces nothing, so the
    probe's wrapper is never inlined into a graph (no graph break, no guard on it, no recompile, no cold
    compile) and the attention of a compiled function or model is seen like any other.  Compiled code
    cached before the probe stays cached and is used again as soon as the probe exits."""
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    if set_stance is None:  # torch < 2.6: no stance; a compiled region then traces the wrapper (slow, still right)
        return None
    try:
        context = set_stance("force_eager")  # sets it now; __exit__ restores the stance found here
    except RuntimeError:  # entered from inside a region being compiled: leave the stance alone
        return None
    context.__enter__()
    return context


UNPROBED_ATTENTION = ("eager", "flash_attention_2", "flex_attention")  # attn_implementation values that never call SDPA


class NoAttentionSeenError(RuntimeError):
    """A probed forward made no attention call the probe could see."""


class AllAttentionSeen(Exception):
    """Raised by a probe given `last_call=n` once it has recorded its n-th attention call, before that call runs:
    a forward that only needs the attention mass has nothing left to compute (caught by forward_through_blocks)."""


def _as_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, *heads, L, D] (or [B, L, D]) -> [B, H, L, D], H the product of the head dims."""
    if x.dim() < 3:
        raise ValueError(f"attention inputs must be at least [batch, length, dim]; got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])


def _mask_as_4d(attn_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """The mask broadcastable to [B, H, L, S] for the [B, H, L, D] view of q (SDPA broadcasts from the right)."""
    if attn_mask is None:
        return None
    m = attn_mask
    while m.dim() < q.dim():
        m = m.unsqueeze(0)
    if q.dim() == 4:
        return m
    if q.dim() == 3:
        return m.unsqueeze(1)
    # more than one head dim: materialise the head dims, then fold them (rare, and chunk-free: O(mask))
    m = m.expand(*q.shape[:-2], m.shape[-2], m.shape[-1])
    return m.reshape(q.shape[0], -1, m.shape[-2], m.shape[-1])


def attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    query_weights: torch.Tensor | None = None,
    chunk_size: int = 128,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """[B, S] float32: softmax attention each key receives, summed over heads and (weighted) queries.

    Same semantics as SDPA: scale defaults to 1/sqrt(head dim); a bool mask marks allowed pairs, a float
    mask is added to the scores; masks broadcast from the right; is_causal is top-left aligned
    (query i sees keys j <= i, as SDPA does when L != S); fewer key heads than query heads means GQA with
    query head h reading key head h // (H_q / H_kv) (enable_gqa's layout, equal to repeat_interleave).
    Rows with every key masked contribute zero (SDPA's math kernel outputs zeros there too); NaN/Inf in
    query or key gives NaN mass (never a silent zero).
    """
    q, k = _as_heads(query.detach()), _as_heads(key.detach())
    batch, q_heads, q_len, _ = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key heads ({kv_heads}) for GQA")
    groups = q_heads // kv_heads
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    mask = _mask_as_4d(attn_mask, query)
    # GQA without repeating k: [B, H_kv, 1, D, S] broadcasts against q viewed as [B, H_kv, G, c, D]
    k_t = k.float().unsqueeze(2).transpose(-1, -2)
    q_grouped = q.unflatten(1, (kv_heads, groups))
    if query_weights is not None:
        query_weights = query_weights.to(device=q.device, dtype=torch.float32).reshape(batch, q_len)
    rows = max(1, min(int(chunk_size), max_chunk_bytes // max(1, batch * q_heads * k_len * 4)))

    mass = torch.zeros(batch, k_len, dtype=torch.float32, device=q.device)
    for start in range(0, q_len, rows):
        stop = min(start + rows, q_len)
        # a helper call, so that this chunk's [B, H, c, S] buffer is freed before the next one is allocated
        per_query = _chunk_probabilities_summed_over_heads(q_grouped, k_t, mask, is_causal, scale, start, stop)
        if query_weights is None:
            mass += per_query.sum(dim=1)
        else:
            mass += torch.einsum("bcs,bc->bs", per_query, query_weights[:, start:stop])
    return mass


def _chunk_probabilities_summed_over_heads(q_grouped, k_t, mask, is_causal, scale, start, stop) -> torch.Tensor:
    """[B, c, S]: softmax probabilities of queries start..stop, summed over heads, in one float32 buffer."""
    scores = torch.matmul(q_grouped[:, :, :, start:stop].float() * scale, k_t).flatten(1, 2)  # [B, H, c, S]
    if mask is not None:
        m = mask if mask.shape[-2] == 1 else mask[..., start:stop, :]
        if m.dtype == torch.bool:
            scores.masked_fill_(~m, float("-inf"))
        else:
            scores += m.float()
    if is_causal:
        k_len = scores.shape[-1]
        above = torch.arange(k_len, device=scores.device) > torch.arange(start, stop, device=scores.device)[:, None]
        scores.masked_fill_(above, float("-inf"))
    # softmax in place (exp(x - max) / Σ) to hold one buffer.  A row with every key masked (max = -inf) gives
    # 0, which is what SDPA's math kernel outputs for it.  NaN/Inf in q or k stays NaN, so that callers can
    # detect it: a blanket nan_to_num here would turn a broken layer into a silent zero mass.
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max.masked_fill_(row_max == float("-inf"), 0.0)
    scores.sub_(row_max).exp_()
    scores.div_(scores.sum(dim=-1, keepdim=True).clamp_min_(torch.finfo(scores.dtype).tiny))
    return scores.sum(dim=1)


def triton_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    query_weights: torch.Tensor | None = None,
    row_logsumexp: torch.Tensor | None = None,
) -> torch.Tensor:
    """attention_mass's result from the fused Triton kernel (same arguments, same layouts of q, k and mask;
    row_logsumexp [B, H_q, L] skips the kernel's first pass)."""
    return attention_triton.attention_mass_triton(
        _as_heads(query.detach()), _as_heads(key.detach()), _mask_as_4d(attn_mask, query), is_causal, scale,
        query_weights=query_weights, row_logsumexp=row_logsumexp,
    )


def _triton_row_logsumexp(query, key, attn_mask, is_causal, scale) -> torch.Tensor:
    """[B, H_q, L] log-sum-exp by the kernel's first pass: the oracle FUSED_SDPA checks an aten op's against."""
    return attention_triton.row_logsumexp_triton(_as_heads(query.detach()), _as_heads(key.detach()),
                                                 _mask_as_4d(attn_mask, query), bool(is_causal), scale)


class AttentionMassProbe:
    """Context manager accumulating attention mass over every SDPA call of the forwards run inside it.

    query_weights: [B, T_q] (bool or float) weights of each query's contribution, e.g. the attention
    mask to leave padding queries out, or a one-hot on the newest token. Set it again with
    `set_query_weights` between passes. chunk_size: query rows per chunk of the float32 recomputation.
    last_call: the number of attention calls a forward makes, when only the mass is wanted: the probe records the
    last call and raises AllAttentionSeen instead of running it (that layer's attention output and everything
    after it are never computed; the mass is unchanged).  An outer probe around it does not see that last call.
    reference_order: each call's mass by the reference's own operations (pipeline/maths/reference.py: its bits, the
    whole [B, H, T, T] softmax at once) wherever it applies (no padding, no attention mask); chunked elsewhere.
    kernel: "auto" (the fused Triton kernel where it runs, see MASS_KERNELS; chunked under reference_order),
    "triton" (always; an error where it cannot run) or "chunked".  calls_by_kernel counts the calls of each path:
    "triton+sdpa_lse" where the output came from the aten op F.sdpa dispatches to, with its row log-sum-exp, so
    that only the kernel's second pass ran (FUSED_SDPA: only for kinds of call verified to give F.sdpa's bits).
    """

    def __init__(self, *, per_layer: bool = False, query_weights: torch.Tensor | None = None, chunk_size: int = 128,
                 last_call: int | None = None, reference_order: bool = False, kernel: str = "auto"):
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be a positive number of query rows")
        if kernel not in MASS_KERNELS:
            raise ValueError(f"kernel={kernel!r} is not one of {MASS_KERNELS}")
        if kernel == "triton" and reference_order:
            raise ValueError("kernel='triton' contradicts reference_order=True (the reference's own operations); "
                             "use kernel='auto'")
        self.kernel = kernel
        self.keep_per_layer = per_layer
        self.chunk_size = int(chunk_size)
        self.query_weights = query_weights
        self.last_call = last_call
        self.reference_order = reference_order  # the reference's own ops (no padding, no mask): its bits, not chunked
        self.mass: torch.Tensor | None = None
        self.per_layer: list[torch.Tensor] = []
        self.calls = 0
        self.calls_by_kernel: dict[str, int] = {}
        self._previous = None
        self._wrapper = None
        self._thread = None
        self._stance = None

    # --- accumulation -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the accumulated mass (call between passes); the probe stays installed."""
        self.mass = None
        self.per_layer = []
        self.calls = 0
        self.calls_by_kernel = {}

    def set_query_weights(self, query_weights: torch.Tensor | None) -> None:
        self.query_weights = query_weights

    def _record(self, query, key, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *, enable_gqa=False,
                row_logsumexp=None):
        weights = self.query_weights
        if weights is not None and tuple(weights.shape) != (query.shape[0], query.shape[-2]):
            raise ValueError(
                f"query_weights has shape {tuple(weights.shape)} but this attention call has "
                f"[batch, queries] = [{query.shape[0]}, {query.shape[-2]}]"
            )
        path = self._mass_kernel(query, key, attn_mask, is_causal, weights)
        layer_mass = None
        if path == "reference":
            layer_mass = reference.collector_attention_mass(query, key, scale)
        elif path == "triton":
            try:
                layer_mass = triton_attention_mass(query, key, attn_mask, bool(is_causal), scale, query_weights=weights,
                                                   row_logsumexp=row_logsumexp)
                path = "triton" if row_logsumexp is None else "triton+sdpa_lse"
            except attention_triton.OutOfResources:  # the tiles do not fit this GPU (shared memory, registers)
                if self.kernel == "triton":
                    raise
                path = "chunked"
        if layer_mass is None:
            layer_mass = attention_mass(
                query, key, attn_mask, bool(is_causal), scale, query_weights=weights, chunk_size=self.chunk_size
            )
        self.calls_by_kernel[path] = self.calls_by_kernel.get(path, 0) + 1
        if self.mass is None:
            self.mass = layer_mass.clone()
        elif self.mass.shape != layer_mass.shape:
            raise ValueError(
                f"attention call {self.calls} has keys of shape {tuple(layer_mass.shape)} but earlier calls had "
                f"{tuple(self.mass.shape)}: call probe.reset() between forwards of different lengths"
            )
        else:
            self.mass += layer_mass
        if self.keep_per_layer:
            self.per_layer.append(layer_mass)
        self.calls += 1

    def _mass_kernel(self, query, key, attn_mask, is_causal, weights) -> str:
        """"reference", "triton" or "chunked": which computation gives this call's mass."""
        if self.reference_order:
            plain = (weights is None or bool(weights.all())) and attn_mask is None and not is_causal
            return "reference" if plain else "chunked"
        if self.kernel == "chunked":
            return "chunked"
        reason = attention_triton.unsupported(query, key)
        if reason is None:
            return "triton"
        if self.kernel == "triton":
            raise ValueError(f"AttentionMassProbe(kernel='triton'): {reason}; use kernel='auto' or 'chunked'")
        return "chunked"

    def _fused_output_and_lse(self, previous, bound):
        """(F.sdpa's output, its [B, H_q, L] log-sum-exp) from one aten call where FUSED_SDPA verified that call's kind;
        None elsewhere: another wrapper is installed (an outer probe must see the call), the mass does not take the
        kernel, or anything fails."""
        if previous is not sdpa_lse.SDPA or self.reference_order or self.kernel == "chunked":
            return None
        a = bound.arguments
        query, key = a["query"], a["key"]
        if not isinstance(query, torch.Tensor) or attention_triton.unsupported(query, key) is not None:
            return None
        fused = FUSED_SDPA.attention(query, key, a["value"], a["attn_mask"], a["dropout_p"], a["is_causal"], a["scale"],
                                     a["enable_gqa"], oracle_lse=_triton_row_logsumexp)
        return None if fused is None else fused[:2]

    def require_attention(self, model=None) -> None:
        """Raise NoAttentionSeenError when the probed forward made no attention call the probe could see."""
        if self.calls:
            return
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        what = f"{type(model).__name__} (attn_implementation={impl!r})" if model is not None else "the model"
        raise NoAttentionSeenError(
            f"{what} has no attention the probe can see: it must call "
            "torch.nn.functional.scaled_dot_product_attention (looked up at call time) during the forward; "
            f"use attn_implementation='sdpa' ({', '.join(UNPROBED_ATTENTION)} are not probed)"
        )

    # --- installation -----------------------------------------------------------------------------
    def __enter__(self) -> "AttentionMassProbe":
        if self._wrapper is not None:
            raise RuntimeError("this AttentionMassProbe is already active; use a second probe to nest")
        previous = F.scaled_dot_product_attention
        thread = threading.get_ident()

        def bind(args, kwargs):
            bound = _SDPA_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            return bound

        def record(bound, row_logsumexp=None):
            with torch.no_grad():
                self._record(**{n: v for n, v in bound.arguments.items() if n != "value"}, row_logsumexp=row_logsumexp)

        def probed_sdpa(*args, **kwargs):
            if threading.get_ident() != thread:
                return previous(*args, **kwargs)
            bound = bind(args, kwargs)
            if self.last_call is not None and self.calls + 1 >= self.last_call:
                record(bound)
                raise AllAttentionSeen()
            fused = self._fused_output_and_lse(previous, bound)
            if fused is None:
                out = previous(*args, **kwargs)  # the real output, untouched
                record(bound)
                return out
            out, row_logsumexp = fused  # the same op F.sdpa calls, verified to give its bits
            record(bound, row_logsumexp)
            return out

        self._stance = _force_eager()
        self._previous, self._wrapper, self._thread = previous, probed_sdpa, thread
        F.scaled_dot_product_attention = probed_sdpa
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if F.scaled_dot_product_attention is not self._wrapper:
            raise RuntimeError(
                "AttentionMassProbe exited out of order: another probe or patch replaced "
                "torch.nn.functional.scaled_dot_product_attention inside this one and is still installed"
            )
        F.scaled_dot_product_attention = self._previous
        self._previous = self._wrapper = self._thread = None
        stance, self._stance = self._stance, None
        if stance is not None:
            stance.__exit__(None, None, None)


force_eager = _force_eager  # public name: PruneCallback runs its hooked forwards under the same stance
