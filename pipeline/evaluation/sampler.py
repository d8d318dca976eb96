"""Diffusion sampling for masked-diffusion LMs (LLaDA's semi-autoregressive block sampler).

    out = diffusion_generate(model, prompt_ids, mask_token_id, gen_length=64, block_length=32, steps=64,
                             temperature=0.0, remasking="low_confidence", generator=g)

The answer region (gen_length positions after the prompt) starts fully masked and is filled block by
block, left to right.  Each block gets its share of `steps`; at every step the model predicts all masked
positions at once and the k most confident predictions *inside the current block* are committed
(k spreads the block's masks evenly over its steps).  Positions of later blocks are never committed
before the current block is complete, and the prompt is never changed.

temperature > 0 samples each prediction with the Gumbel-max trick (argmax(logits/T + Gumbel) ~
softmax(logits/T)); temperature = 0 is greedy.  remasking="low_confidence" ranks candidates by the
model's softmax probability of the predicted token; "random" ranks them uniformly at random.
The mask token is never predicted, so every mask is filled when sampling ends.
"""
from __future__ import annotations

import torch

from pipeline.model.loading import dlm_forward

REMASKING = ("low_confidence", "random")


def split_evenly(total: int, parts: int) -> list[int]:
    """total split into `parts` integers differing by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def allocate_steps(steps: int, block_sizes: list[int]) -> list[int]:
    """Steps per block in proportion to block size (largest remainders), at least 1 and at most the size."""
    total = sum(block_sizes)
    quotas = [steps * size / total for size in block_sizes]
    alloc = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: quotas[i] - alloc[i], reverse=True)
    for i in by_remainder[: steps - sum(alloc)]:
        alloc[i] += 1
    return [min(size, max(1, a)) for a, size in zip(alloc, block_sizes)]


def guided_logits(model, x: torch.Tensor, prompt_mask: torch.Tensor, mask_token_id: int, cfg: float = 0.0):
    """The model's logits on x (`loading.dlm_forward`: DiffusionGemma denoises x as its canvas), or unsupervised classifier-free guidance when cfg > 0.

    Guidance (LLaDA): logits = uncond + (cfg + 1)·(cond − uncond), where uncond sees the prompt positions
    (`prompt_mask`, [L] or [B, L] bool) replaced by the mask token.  cfg = 0 is one plain forward.
    """
    if cfg == 0:
        return dlm_forward(model, x).logits
    uncond = x.clone()
    uncond[prompt_mask.expand_as(x)] = mask_token_id
    both = dlm_forward(model, torch.cat([x, uncond])).logits
    cond, unc = both.chunk(2, dim=0)
    return unc + (cfg + 1.0) * (cond - unc)


def _gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None):
    if temperature <= 0:
        return logits.argmax(dim=-1)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits.double() / temperature + gumbel).argmax(dim=-1)


def _commit_step(model, x, prompt_mask, mask_token_id, cfg, temperature, remasking, generator, start, end, n_commit) -> None:
    """One denoising step: predict every masked token, commit the n_commit most confident in [start, end)."""
    device = x.device
    masked = x == mask_token_id
    logits = guided_logits(model, x, prompt_mask, mask_token_id, cfg)
    logits[..., mask_token_id] = float("-inf")
    pred = _gumbel_argmax(logits, temperature, generator).to(torch.long)
    if remasking == "low_confidence":
        probs = torch.softmax(logits.float(), dim=-1)
        confidence = probs.gather(-1, pred.unsqueeze(-1)).squeeze(-1)
    else:
        confidence = torch.rand(x.shape, generator=generator).to(device)
    candidate = masked.clone()
    candidate[:, :start] = False
    candidate[:, end:] = False
    confidence = torch.where(candidate, confidence, torch.tensor(float("-inf"), device=device))
    chosen = confidence.topk(n_commit, dim=-1).indices
    x.scatter_(1, chosen, pred.gather(1, chosen))


@torch.no_grad()
def diffusion_generate(
    model,
    prompt_ids: torch.Tensor,
    mask_token_id: int,
    gen_length: int = 128,
    block_length: int = 32,
    steps: int = 128,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    generator: torch.Generator | None = None,
    *,
    cfg: float = 0.0,
    keep_prompt_in_guidance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return [B, P + gen_length]: the prompt followed by the generated tokens.

    prompt_ids is [P] or [B, P] (rows of equal length, no padding).  gen_length need not be a multiple of
    block_length (the last block is then shorter); steps is shared among blocks in proportion to their size
    (at least one each) and capped at the number of tokens, since a step commits at least one token.  `generator` (CPU) drives
    Gumbel and random-remasking noise.  cfg > 0 adds unsupervised classifier-free guidance with the
    prompt masked, except positions flagged in `keep_prompt_in_guidance` ([P] bool, e.g. BOS/[CLS]).
    """
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r}; use one of {REMASKING}")
    if gen_length < 1 or block_length < 1 or steps < 1:
        raise ValueError(f"gen_length={gen_length}, block_length={block_length}, steps={steps} must be >= 1")
    prompt = prompt_ids if prompt_ids.dim() == 2 else prompt_ids[None]
    batch, plen = prompt.shape
    device = prompt.device
    x = torch.full((batch, plen + gen_length), mask_token_id, dtype=torch.long, device=device)
    x[:, :plen] = prompt

    prompt_mask = torch.zeros(plen + gen_length, dtype=torch.bool, device=device)
    prompt_mask[:plen] = True
    if keep_prompt_in_guidance is not None:
        prompt_mask[:plen] &= ~keep_prompt_in_guidance.to(device)

    full_blocks, rest = divmod(gen_length, block_length)
    block_sizes = [block_length] * full_blocks + ([rest] if rest else [])
    steps_per_block = allocate_steps(min(steps, gen_length), block_sizes)
    start = plen
    for size, block_steps in zip(block_sizes, steps_per_block):
        end = start + size
        for n_commit in split_evenly(size, block_steps):
            _commit_step(model, x, prompt_mask, mask_token_id, cfg, temperature, remasking, generator, start, end, n_commit)
        start = end
    return x
