"""Attention sinks from attention mass: sink scores, per-sample statistics, token kinds.

`mass` is what pipeline.maths.attention.AttentionMassProbe accumulates: [B, T] attention each key position
receives, summed over queries, heads and layers. Everything here is a pure function of it; `valid`
([B, T] bool) leaves padding positions out of every statistic.

The DLM-vs-AR measurement built on these is `python -m pipeline.evaluation.sink_report --help`.
"""
from __future__ import annotations

import math
from collections import Counter
import unicodedata

import torch


def _valid_or_all(mass: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return torch.ones_like(mass, dtype=torch.bool)
    if valid.shape != mass.shape:
        raise ValueError(f"valid has shape {tuple(valid.shape)} but mass has {tuple(mass.shape)}")
    return valid.to(device=mass.device, dtype=torch.bool)


def sink_scores(
    mass: torch.Tensor, k: float = 2.0, alpha: float = 5.0, valid: torch.Tensor | None = None, unbiased: bool = False
) -> torch.Tensor:
    """s = sigmoid(alpha·(mass − (mean + k·std))) per sample over its valid positions; 0 at invalid ones.

    mean and std are taken per row over valid positions of the raw (unnormalised) mass, as in the
    reference implementation (VILA-Lab/Sink-Aware-Pruning, lib/prune_llada.py `_compute_sink_mask`:
    `mass.std(dim=1, unbiased=False)`), i.e. the POPULATION std by default; unbiased=True divides by
    n − 1 instead. A row whose mass is flat has std 0 and every position scores sigmoid(0) = 0.5.
    """
    mass = mass.float()
    keep = _valid_or_all(mass, valid)
    n = keep.sum(dim=1, keepdim=True).clamp_min(1)
    mean = (mass * keep).sum(dim=1, keepdim=True) / n
    sq_dev = ((mass - mean) ** 2 * keep).sum(dim=1, keepdim=True)
    std = (sq_dev / (n - 1).clamp_min(1) if unbiased else sq_dev / n).sqrt()
    scores = torch.sigmoid(alpha * (mass - (mean + k * std)))
    return torch.where(keep, scores, torch.zeros_like(scores))


def mass_statistics(mass: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per sample: dominant_position (argmax), top1_share (its fraction of the row's mass),
    normalized_entropy (entropy of mass/Σmass divided by log n, n the valid positions: 1 = flat, 0 = one
    position takes everything) and uniform_share (1/n, what top1_share would be with no sink)."""
    mass = mass.double()
    keep = _valid_or_all(mass, valid)
    masked = torch.where(keep, mass, torch.zeros_like(mass))
    p = masked / masked.sum(dim=1, keepdim=True).clamp_min(1e-300)
    n = keep.sum(dim=1)
    dominant = torch.where(keep, mass, torch.full_like(mass, -math.inf)).argmax(dim=1)
    entropy = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(dim=1)
    log_n = n.double().log()
    return {
        "dominant_position": dominant,
        "top1_share": p.gather(1, dominant[:, None])[:, 0].float(),
        "normalized_entropy": torch.where(n > 1, entropy / log_n.clamp_min(1e-300), torch.zeros_like(entropy)).float(),
        "uniform_share": (1.0 / n.clamp_min(1).double()).float(),
    }


def sink_position_variance(dominant_positions_by_timestep, per_sample: bool = False):
    """The paper's temporal-stability metric: variance of the dominant sink position across timesteps.

    Input: one sequence per sample of its dominant (argmax-mass) position at each timestep / step,
    i.e. [samples, timesteps] (a tensor, or a list of lists that may differ in length). For each sample
    the POPULATION variance (ddof = 0, mean squared deviation from the sample's own mean position) is
    taken over its timesteps, in squared positions; the result is the mean over samples (samples with
    a single timestep contribute 0). per_sample=True returns the per-sample list instead.
    A sink fixed at one position gives 0; a sink jumping between positions 0 and 10 gives 25.
    """
    rows = dominant_positions_by_timestep
    if isinstance(rows, torch.Tensor):
        rows = rows.reshape(rows.shape[0], -1).tolist() if rows.dim() else [[rows.item()]]
    variances = []
    for positions in rows:
        values = [float(p) for p in positions]
        if not values:
            continue
        mean = sum(values) / len(values)
        variances.append(sum((v - mean) ** 2 for v in values) / len(values))
    if per_sample:
        return variances
    return sum(variances) / len(variances) if variances else float("nan")


def _is_punctuation(text: str) -> bool:
    # unicode punctuation (P*) and symbols (S*); whitespace-only pieces (newlines) count here too
    stripped = text.replace("##", "").replace("\u2581", "").replace("\u0120", "").replace("\u010a", "")
    stripped = "".join(ch for ch in stripped if not ch.isspace())
    return not stripped or all(unicodedata.category(ch)[0] in "PS" for ch in stripped)


def token_kind(token_id: int, tokenizer, mask_id: int | None) -> str:
    """'mask', 'bos/cls', 'eos/sep', 'pad', 'punctuation' (incl. whitespace/newline tokens) or 'word'.

    Special ids are read from the tokenizer (cls/bos, sep/eos, pad); without a tokenizer anything but
    the mask is 'token'. When a tokenizer uses one id for several roles the order above decides.
    """
    token_id = int(token_id)
    if mask_id is not None and token_id == int(mask_id):
        return "mask"
    if tokenizer is None:
        return "token"
    roles = (("bos/cls", ("cls_token_id", "bos_token_id")), ("eos/sep", ("sep_token_id", "eos_token_id")),
             ("pad", ("pad_token_id",)))
    for kind, attrs in roles:
        if any(getattr(tokenizer, a, None) == token_id for a in attrs):
            return kind
    if token_id in set(getattr(tokenizer, "all_special_ids", []) or []):
        return "special"
    piece = tokenizer.convert_ids_to_tokens(token_id)
    return "punctuation" if _is_punctuation(piece if isinstance(piece, str) else "") else "word"


def causal_baseline_share(n: int) -> float:
    """H_n / n: position 0's share of all attention when each of n causal queries attends uniformly to
    its prefix (query i gives 1/i to key 0). The share a "sink" at 0 reaches with no sink at all."""
    if n < 1:
        raise ValueError(f"n={n} must be a positive sequence length")
    return sum(1.0 / i for i in range(1, n + 1)) / n


def positional_sink(dominant_positions: list[int], kinds: list[str], threshold: float = 0.95) -> dict | None:
    """A sink on one absolute position in >= threshold of all (window, timestep) pairs: {position, fraction,
    kinds of the tokens it sat on}, else None.  Such a sink cannot move across timesteps (e.g. BERT's learned
    position-0 embedding holds it even when [CLS] is masked), so down-weighting it is the AR recipe.

    dominant_positions / kinds: the dominant key's position and token kind of every (window, timestep)."""
    if not dominant_positions:
        return None
    position, count = Counter(dominant_positions).most_common(1)[0]
    fraction = count / len(dominant_positions)
    if fraction < threshold:
        return None
    there = Counter(k for p, k in zip(dominant_positions, kinds) if p == position)
    return {"position": position, "fraction": fraction, "kinds": dict(there.most_common())}
