"""Log-likelihood of a continuation under a masked-diffusion LM: LLaDA's Monte Carlo ELBO estimate.

For a prompt p and a target x of L tokens, the ELBO lower-bounds log p(x | p):

    log p(x | p) >= -E_k E_S [ (L / k) · Σ_{i in S} CE(x_i | p, x with S masked) ]

with k ~ Uniform{1..L} masked target tokens and S a uniformly random k-subset of the target (the prompt
is never masked).  `mc_loglikelihood` draws mc_num (k, S) pairs with k stratified: t_j =
(j + u) / mc_num for one offset u, k_j = ceil(t_j · L), so every k in 1..L gets its exact share of draws
(when L divides mc_num, only the subset choice is random).  `exact_loglikelihood` enumerates every subset,
for tiny L, and is what the Monte Carlo estimate converges to.
"""
from __future__ import annotations

import itertools

import torch

from pipeline.maths.diffusion import masked_token_nll, stratified_timesteps
from pipeline.evaluation.sampler import guided_logits


def stratified_mask_counts(mc_num: int, target_len: int, offset: float) -> torch.Tensor:
    """k_j = ceil(t_j · L) in 1..L for stratified t_j: each count gets probability 1/L, as in the ELBO."""
    t = stratified_timesteps(mc_num, offset).double()
    return torch.ceil(t * target_len).long().clamp(1, target_len)


def _masked_target_nll(model, seq, prompt_len, target_masks, mask_token_id, cfg, keep_in_guidance):
    """Σ CE over masked target positions for each row of target_masks ([b, L] bool), as a [b] tensor."""
    rows = target_masks.shape[0]
    noisy = seq.unsqueeze(0).repeat(rows, 1)
    full_mask = torch.zeros_like(noisy, dtype=torch.bool)
    full_mask[:, prompt_len:] = target_masks
    noisy[full_mask] = mask_token_id
    prompt_mask = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    prompt_mask[:prompt_len] = True
    if keep_in_guidance is not None:
        prompt_mask[: len(keep_in_guidance)] &= ~keep_in_guidance.to(seq.device)
    logits = guided_logits(model, noisy, prompt_mask, mask_token_id, cfg)[:, prompt_len:]
    targets = seq[prompt_len:].unsqueeze(0).expand(rows, -1)
    return masked_token_nll(logits, targets, target_masks.to(logits.device))


@torch.no_grad()
def mc_loglikelihood(
    model,
    prompt_ids: torch.Tensor,
    target_ids: torch.Tensor,
    mask_token_id: int,
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    cfg: float = 0.0,
    generator: torch.Generator | None = None,
    keep_in_guidance: torch.Tensor | None = None,
) -> float:
    """Monte Carlo ELBO estimate of log p(target | prompt), averaged over mc_num draws, batch_size per forward.

    prompt_ids ([P], may be empty) and target_ids ([L]) are 1-D; the model sees cat(prompt, target).
    `keep_in_guidance` ([<= P] bool) marks prompt positions left visible in the unconditional CFG pass.
    """
    target_len = int(target_ids.numel())
    if target_len == 0:
        return 0.0
    seq = torch.cat([prompt_ids, target_ids]).long()
    prompt_len = int(prompt_ids.numel())
    offset = float(torch.rand((), generator=generator))
    counts = stratified_mask_counts(mc_num, target_len, offset)
    total = 0.0
    for start in range(0, mc_num, batch_size):
        chunk = counts[start : start + batch_size]
        masks = torch.zeros(len(chunk), target_len, dtype=torch.bool)
        for row, k in enumerate(chunk.tolist()):
            masks[row, torch.randperm(target_len, generator=generator)[:k]] = True
        nll = _masked_target_nll(model, seq.to(_device(model)), prompt_len, masks, mask_token_id, cfg,
                                 keep_in_guidance)
        total += float((nll.cpu().double() * target_len / chunk.double()).sum())
    return -total / mc_num


@torch.no_grad()
def exact_loglikelihood(
    model, prompt_ids: torch.Tensor, target_ids: torch.Tensor, mask_token_id: int, *, cfg: float = 0.0
) -> float:
    """The ELBO's exact value by enumerating all 2^L − 1 masked subsets (tiny L only)."""
    target_len = int(target_ids.numel())
    if target_len > 12:
        raise ValueError(f"exact enumeration over {target_len} target tokens is intractable")
    seq = torch.cat([prompt_ids, target_ids]).long().to(_device(model))
    expectation = 0.0
    for k in range(1, target_len + 1):
        subsets = list(itertools.combinations(range(target_len), k))
        masks = torch.zeros(len(subsets), target_len, dtype=torch.bool)
        for row, subset in enumerate(subsets):
            masks[row, list(subset)] = True
        nll = _masked_target_nll(model, seq, int(prompt_ids.numel()), masks, mask_token_id, cfg, None)
        expectation += (1.0 / target_len) * (target_len / k) * float(nll.double().mean())
    return -expectation


@torch.no_grad()
def greedy_match(
    model,
    prompt_ids: torch.Tensor,
    target_ids: torch.Tensor,
    mask_token_id: int,
    *,
    mode: str = "single",
    cfg: float = 0.0,
    keep_in_guidance: torch.Tensor | None = None,
) -> bool:
    """Would greedy decoding produce the target?

    "single": one forward with the whole target masked; True when the argmax at every target position
    (mask token excluded) is the target token.  Cheap, and the natural notion for a model that predicts
    all masked positions in parallel.
    "iterative" (LLaDA's check): L forwards, committing the single most confident argmax each time;
    True when the decoded target equals it.  "none": always False.
    """
    target_len = int(target_ids.numel())
    if mode == "none" or target_len == 0:
        return target_len == 0
    if mode not in ("single", "iterative"):
        raise ValueError(f"greedy_check={mode!r}; use 'single', 'iterative' or 'none'")
    device = _device(model)
    prompt_len = int(prompt_ids.numel())
    x = torch.cat([prompt_ids, torch.full((target_len,), mask_token_id)]).long().to(device)[None]
    prompt_mask = torch.zeros(x.shape[1], dtype=torch.bool, device=device)
    prompt_mask[:prompt_len] = True
    if keep_in_guidance is not None:
        prompt_mask[: len(keep_in_guidance)] &= ~keep_in_guidance.to(device)
    for _ in range(1 if mode == "single" else target_len):
        logits = guided_logits(model, x, prompt_mask, mask_token_id, cfg)[0, prompt_len:].float()
        logits[:, mask_token_id] = float("-inf")
        if mode == "single":
            return bool((logits.argmax(-1).cpu() == target_ids.cpu()).all())
        still_masked = x[0, prompt_len:] == mask_token_id
        probs = logits.softmax(-1)
        conf, pred = probs.max(-1)
        conf[~still_masked] = float("-inf")
        pos = int(conf.argmax())
        x[0, prompt_len + pos] = pred[pos]
    return bool((x[0, prompt_len:].cpu() == target_ids.cpu()).all())


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")

