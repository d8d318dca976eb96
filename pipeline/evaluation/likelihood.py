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
from collections import OrderedDict

import torch

from pipeline.maths.diffusion import masked_token_nll, stratified_timesteps
from pipeline.model.head import suffix_logits
from pipeline.evaluation.sampler import guided_logits


def stratified_mask_counts(mc_num: int, target_len: int, offset: float) -> torch.Tensor:
    """k_j = ceil(t_j · L) in 1..L for stratified t_j: each count gets probability 1/L, as in the ELBO."""
    t = stratified_timesteps(mc_num, offset).double()
    return torch.ceil(t * target_len).long().clamp(1, target_len)


def _guidance_prompt_mask(length: int, prompt_len: int, keep_in_guidance, device) -> torch.Tensor:
    """[length] bool: the prompt positions the unconditional CFG pass masks (special prefix kept)."""
    prompt_mask = torch.zeros(length, dtype=torch.bool, device=device)
    prompt_mask[:prompt_len] = True
    if keep_in_guidance is not None:
        prompt_mask[: len(keep_in_guidance)] &= ~keep_in_guidance.to(device)
    return prompt_mask


class TargetLogits:
    """The logits at the target positions of noised sequences, one forward per distinct sequence.

    Draws of one request repeat (a one-token target is masked the same way by every draw and by the greedy
    check) and requests share them (the one-token choices of a question see the same `prompt [MASK]`), so
    each distinct (sequence, prompt length) is run once per scoring pass and kept, up to `max_floats` logits;
    the head is computed only at the target positions (pipeline.model.head).  One instance per model state:
    DiffusionLM makes one per lm-eval request list.
    """

    def __init__(self, model, mask_token_id: int, cfg: float = 0.0, keep_in_guidance=None, max_floats: int = 1 << 24):
        self.model, self.mask_token_id, self.cfg, self.keep = model, mask_token_id, float(cfg), keep_in_guidance
        self.max_floats, self.floats, self.rows_run = max_floats, 0, 0
        self.store: OrderedDict = OrderedDict()

    def __call__(self, rows: torch.Tensor, prompt_len: int, batch_size: int) -> torch.Tensor:
        """rows [R, P + L] (long, CPU) -> logits [R, L, V] at their last L = len - prompt_len positions."""
        target_len = rows.shape[1] - prompt_len
        keys = [(prompt_len, row.numpy().tobytes()) for row in rows]
        first = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        got = {k: self.store[k] for k in first if k in self.store}
        for k in got:
            self.store.move_to_end(k)
        missing = [k for k in first if k not in got]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            out = self._forward(rows[[first[k] for k in chunk]], prompt_len, target_len)
            self.rows_run += len(chunk)
            for key, logits in zip(chunk, out):
                got[key] = logits.clone()  # not a view: a fallback full forward's logits are freed
                self._keep(key, got[key])
        return torch.stack([got[k] for k in keys])

    def _forward(self, rows: torch.Tensor, prompt_len: int, target_len: int) -> torch.Tensor:
        device = _device(self.model)
        x = rows.to(device)
        prompt_mask = _guidance_prompt_mask(x.shape[1], prompt_len, self.keep, device)
        return suffix_logits(self.model, lambda: guided_logits(self.model, x, prompt_mask, self.mask_token_id, self.cfg),
                             target_len)

    def _keep(self, key, logits: torch.Tensor) -> None:
        self.store[key] = logits
        self.floats += logits.numel()
        while self.floats > self.max_floats and len(self.store) > 1:
            _, old = self.store.popitem(last=False)
            self.floats -= old.numel()


def _draw_masks(mc_num: int, target_len: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_j [mc_num], masks [mc_num, L] bool): stratified counts, then a uniformly random k_j-subset per draw."""
    offset = float(torch.rand((), generator=generator))
    counts = stratified_mask_counts(mc_num, target_len, offset)
    masks = torch.zeros(mc_num, target_len, dtype=torch.bool)
    for row, k in enumerate(counts.tolist()):
        masks[row, torch.randperm(target_len, generator=generator)[:k]] = True
    return counts, masks


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
    cache: TargetLogits | None = None,
) -> float:
    """Monte Carlo ELBO estimate of log p(target | prompt), averaged over mc_num draws, batch_size per forward.

    prompt_ids ([P], may be empty) and target_ids ([L]) are 1-D; the model sees cat(prompt, target).
    `keep_in_guidance` ([<= P] bool) marks prompt positions left visible in the unconditional CFG pass.
    `cache` (a TargetLogits of this model, cfg and keep_in_guidance) shares forwards across requests;
    draws that mask the same positions are run once either way.
    """
    target_len = int(target_ids.numel())
    if target_len == 0:
        return 0.0
    seq = torch.cat([prompt_ids, target_ids]).long().cpu()
    prompt_len = int(prompt_ids.numel())
    counts, masks = _draw_masks(mc_num, target_len, generator)
    rows = seq.unsqueeze(0).repeat(mc_num, 1)
    rows[:, prompt_len:][masks] = mask_token_id
    cache = cache or TargetLogits(model, mask_token_id, cfg, keep_in_guidance)
    targets = target_ids.cpu().long().unsqueeze(0)
    total = 0.0
    for start in range(0, mc_num, batch_size):
        part = slice(start, start + batch_size)
        logits = cache(rows[part], prompt_len, batch_size)
        nll = masked_token_nll(logits, targets.expand(len(logits), -1).to(logits.device), masks[part].to(logits.device))
        total += float((nll.cpu().double() * target_len / counts[part].double()).sum())
    return -total / mc_num


def _masked_target_nll(model, seq, prompt_len, target_masks, mask_token_id, cfg, keep_in_guidance):
    """Σ CE over masked target positions for each row of target_masks ([b, L] bool), as a [b] tensor."""
    rows = target_masks.shape[0]
    noisy = seq.unsqueeze(0).repeat(rows, 1)
    full_mask = torch.zeros_like(noisy, dtype=torch.bool)
    full_mask[:, prompt_len:] = target_masks
    noisy[full_mask] = mask_token_id
    prompt_mask = _guidance_prompt_mask(seq.shape[0], prompt_len, keep_in_guidance, seq.device)
    logits = guided_logits(model, noisy, prompt_mask, mask_token_id, cfg)[:, prompt_len:]
    targets = seq[prompt_len:].unsqueeze(0).expand(rows, -1)
    return masked_token_nll(logits, targets, target_masks.to(logits.device))


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
    cache: TargetLogits | None = None,
) -> bool:
    """Would greedy decoding produce the target?

    "single": one forward with the whole target masked; True when the argmax at every target position
    (mask token excluded) is the target token.  Cheap, and the natural notion for a model that predicts
    all masked positions in parallel.
    "iterative" (LLaDA's check): L forwards, committing the single most confident argmax each time;
    True when the decoded target equals it.  "none": always False.  `cache`: as in mc_loglikelihood.
    """
    target_len = int(target_ids.numel())
    if mode == "none" or target_len == 0:
        return target_len == 0
    if mode not in ("single", "iterative"):
        raise ValueError(f"greedy_check={mode!r}; use 'single', 'iterative' or 'none'")
    prompt_len = int(prompt_ids.numel())
    x = torch.cat([prompt_ids.cpu(), torch.full((target_len,), mask_token_id)]).long()[None]
    if mode == "single":  # the all-masked row: usually one of the Monte Carlo draws already (cache)
        cache = cache or TargetLogits(model, mask_token_id, cfg, keep_in_guidance)
        logits = cache(x, prompt_len, 1)[0].float()
        logits[:, mask_token_id] = float("-inf")
        return bool((logits.argmax(-1).cpu() == target_ids.cpu()).all())
    device = _device(model)
    x = x.to(device)
    prompt_mask = _guidance_prompt_mask(x.shape[1], prompt_len, keep_in_guidance, device)
    for _ in range(target_len):
        logits = guided_logits(model, x, prompt_mask, mask_token_id, cfg)[0, prompt_len:].float()
        logits[:, mask_token_id] = float("-inf")
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

