"""Masked diffusion: the forward (masking) process, its timestep schedule and the ELBO.

A masked-diffusion LM is trained to undo x_t = forward_process(x_0, t): every token is replaced by the
mask token with probability p(t) = (1 - eps)·t + eps.  The negative ELBO per token is
E_t[ Σ_masked CE / p(t) ] / L, which is what LLaDA trains on and what we report as perplexity.

`noise="uniform"` is the random-token variant (DiffusionGemma, uniform-state diffusion): a noised position is
replaced by a token drawn uniformly from the vocabulary [0, vocab_size) instead of the mask token, so a
fraction p(t)·(1 - 1/V) of the tokens actually changes; `masked` still reports every noised position.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

DEFAULT_EPS = 1e-3


def mask_probability(t: torch.Tensor | float, eps: float = DEFAULT_EPS) -> torch.Tensor:
    return (1.0 - eps) * torch.as_tensor(t, dtype=torch.float32) + eps


def timestep_grid(steps: int = 10) -> list[float]:
    """The reference's calibration timesteps: t = 1/steps, 2/steps, …, 1."""
    if steps < 1:
        raise ValueError(f"timesteps={steps} must be a positive count or a list of values in (0, 1]")
    return [round((i + 1) / steps, 6) for i in range(steps)]


def noise_seed(seed: int, sample_index: int, step: int) -> int:
    """A seed that depends only on (global seed, the sample's global index, timestep index).

    Hashing rather than arithmetic keeps neighbouring samples' streams unrelated, and makes the noise
    independent of which rank or batch a sample lands in (DDP determinism).
    """
    return hashed_seed(f"{seed}:{sample_index}:{step}")


def hashed_seed(key: str) -> int:
    """A 63-bit seed from a string (blake2b): the same key gives the same seed on every rank and run."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def per_sample_uniform(shape: tuple[int, int], seeds: list[int]) -> torch.Tensor:
    """Uniform [B, L] noise whose row b is drawn from its own generator seeded with seeds[b]."""
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        rows.append(torch.rand(shape[1], generator=g))
    return torch.stack(rows) if rows else torch.empty(shape)


NOISES = ("mask", "uniform")


def per_sample_tokens(shape: tuple[int, int], seeds: list[int], vocab_size: int) -> torch.Tensor:
    """Uniform random token ids [B, L] in [0, vocab_size), row b from its own generator seeded with seeds[b]."""
    rows = [torch.randint(vocab_size, (shape[1],), generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(rows) if rows else torch.empty(shape, dtype=torch.long)


def token_seed(seed: int) -> int:
    """The seed of the replacement tokens that go with a noise seed (a separate stream, same determinism)."""
    return hashed_seed(f"tokens:{seed}")


def forward_process(
    input_ids: torch.Tensor,
    t: torch.Tensor | float,
    mask_token_id: int,
    *,
    eps: float = DEFAULT_EPS,
    keep: torch.Tensor | None = None,
    uniform: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: str = "mask",
    vocab_size: int | None = None,
    replacement: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise each token with probability (1 - eps)·t + eps.

    t is a scalar or one value per row.  `keep` marks positions never noised (prompt, BOS).  `uniform`
    supplies the [B, L] noise explicitly (for per-sample seeds); otherwise it is drawn from `generator`.
    noise="mask" writes `mask_token_id`; noise="uniform" writes a uniformly random token of [0, vocab_size):
    `replacement` [B, L] supplies those tokens (e.g. `per_sample_tokens`), else they are drawn from `generator`.
    Returns (noisy ids, bool mask of noised positions, p_mask per row [B, 1]).
    """
    if noise not in NOISES:
        raise ValueError(f"noise={noise!r}: use one of {', '.join(NOISES)}")
    if noise == "uniform" and replacement is None and not (isinstance(vocab_size, int) and vocab_size > 1):
        raise ValueError(f"noise='uniform' needs vocab_size > 1 (got {vocab_size!r}) or explicit replacement tokens")
    b, length = input_ids.shape
    p_mask = mask_probability(t, eps).reshape(-1, 1).expand(b, 1).to(input_ids.device)
    if uniform is None:
        uniform = torch.rand((b, length), generator=generator)
    masked = uniform.to(input_ids.device) < p_mask
    if keep is not None:
        masked &= ~keep.to(torch.bool)
    if noise == "uniform":
        if replacement is None:
            replacement = torch.randint(vocab_size, (b, length), generator=generator)
        fill = replacement.to(device=input_ids.device, dtype=input_ids.dtype)
    else:
        fill = torch.full_like(input_ids, mask_token_id)
    noisy = torch.where(masked, fill, input_ids)
    return noisy, masked, p_mask


def masked_token_nll(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Per-row sum of cross-entropy over masked positions, [B], in float32."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return (ce * masked).sum(dim=1)


def stratified_timesteps(n: int, offset: float) -> torch.Tensor:
    """n timesteps covering (0, 1] in equal strata, shifted by one offset in [0, 1): low-variance ELBO."""
    return ((torch.arange(n, dtype=torch.float64) + offset) / n).clamp_min(1e-6).float()


MAX_LENGTH_KEYS = ("max_position_embeddings", "max_sequence_length", "n_positions", "max_seq_len")


def config_max_length(config) -> int | None:
    """The longest sequence a model config declares (the first of MAX_LENGTH_KEYS that is set), else None.
    `config`: a transformers config or its config.json as a dict."""
    for key in MAX_LENGTH_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_window(seqlen: int | None, config) -> None:
    """The calibration window fits the model (preflight reads config.json, DLMModule the loaded config)."""
    limit = config_max_length(config)
    if seqlen is not None and limit is not None and seqlen > limit:
        raise ValueError(f"data.seqlen={seqlen} exceeds the model's maximum sequence length {limit}; lower data.init_args.seqlen")
