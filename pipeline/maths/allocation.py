"""How much of each layer to prune: one fraction for every layer, fractions by layer-name glob, or a profile.

    parse_sparsity(0.5)                               # every layer 50%
    parse_sparsity({"*.attention.*": 0.4, "*": 0.6})  # the first glob that matches a layer's full name wins
    parse_sparsity({"profile": "owl", "average": 0.6, "lmbda": 0.08, "m": 5})   # or "owl" (average 0.5)

OWL (outlier-weighted layerwise sparsity; Yin et al. 2023, arXiv 2310.05175): per transformer block b, the outlier
ratio D_b is the fraction of the block's Wanda scores |W_ij|·‖X_j‖ above m times the block's mean score, computed
from the same calibration statistics the pruner uses (for sink-aware methods, the inputs weighted by 1 − s).  The
ratios are scaled to [0, 2λ], r_b = 2λ·(D_b − min D)/(max D − min D), and the block's target is
    s_b = average − (r_b − Σ_c w_c r_c)            w_c = block c's share of the targeted parameters,
so blocks with more outliers are pruned less and the parameter-weighted mean of the targets is `average` exactly
(the paper's rule subtracts the plain mean of r, which is the same when the blocks are equally large).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch

PROFILES = ("owl",)


@dataclass(frozen=True)
class Uniform:
    sparsity: float

    @property
    def average(self) -> float:
        return self.sparsity

    def targets(self, names) -> dict[str, float]:
        return {n: self.sparsity for n in names}


@dataclass(frozen=True)
class ByGlob:
    patterns: tuple[tuple[str, float], ...]  # (glob on the full layer name, fraction), first match wins
    average = None                           # known once the layers are (their parameter-weighted mean)

    def targets(self, names) -> dict[str, float]:
        out = {}
        for name in names:
            match = next((s for pattern, s in self.patterns if fnmatch.fnmatchcase(name, pattern)), None)
            if match is None:
                raise ValueError(f"prune sparsity: no glob matches layer {name}; add a pattern for it or a catch-all '*'")
            out[name] = match
        return out


@dataclass(frozen=True)
class Owl:
    average: float = 0.5
    lmbda: float = 0.08   # the targets span at most average ± 2·lmbda
    m: float = 5.0        # a score is an outlier above m times its block's mean score


def _fraction(field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"prune {field}={value!r} must be in [0, 1); e.g. 0.5 for 50%")
    return float(value)


def parse_sparsity(value) -> Uniform | ByGlob | Owl:
    """A float, {glob: float, ...}, "owl" or {"profile": "owl", "average": s, "lmbda": λ, "m": M}; one-line errors."""
    if isinstance(value, str):
        if value not in PROFILES:
            raise ValueError(f"prune sparsity={value!r}: a profile must be one of {', '.join(PROFILES)} (or give a number, e.g. 0.5)")
        value = {"profile": value}
    if not isinstance(value, dict):
        return Uniform(_fraction("sparsity", value))
    if "profile" not in value:
        if not value:
            raise ValueError("prune sparsity={}: give at least one glob, e.g. {'*': 0.5}")
        return ByGlob(tuple((str(k), _fraction(f"sparsity[{k!r}]", v)) for k, v in value.items()))
    unknown = sorted(set(value) - {"profile", "average", "lmbda", "m"})
    if value["profile"] not in PROFILES or unknown:
        raise ValueError(f"prune sparsity: profile {value['profile']!r} with keys {unknown or 'ok'}; use "
                         "{profile: owl, average: 0.5, lmbda: 0.08, m: 5}")
    owl = Owl(_fraction("sparsity.average", value.get("average", 0.5)), float(value.get("lmbda", 0.08)), float(value.get("m", 5.0)))
    if not (owl.lmbda >= 0 and math.isfinite(owl.lmbda)) or not (owl.m > 0 and math.isfinite(owl.m)):
        raise ValueError(f"prune sparsity: owl lmbda={owl.lmbda} must be >= 0 and m={owl.m} > 0 (defaults 0.08 and 5)")
    if owl.average - 2 * owl.lmbda < 0 or owl.average + 2 * owl.lmbda >= 1:
        raise ValueError(f"prune sparsity: owl targets may reach average ± 2·lmbda = {owl.average - 2 * owl.lmbda:.3f} … "
                         f"{owl.average + 2 * owl.lmbda:.3f}, outside [0, 1); lower lmbda")
    return owl


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """The fraction of all scores (one block's layers together) above m times their mean."""
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    threshold = m * total / max(count, 1)
    return sum(int((s > threshold).sum()) for s in scores) / max(count, 1)


def owl_targets(ratios: list[float], sizes: list[int], average: float, lmbda: float) -> list[float]:
    """Per-block targets from the blocks' outlier ratios and parameter counts (module docstring)."""
    low, high = min(ratios), max(ratios)
    scaled = [0.0 if high == low else 2 * lmbda * (d - low) / (high - low) for d in ratios]
    mean = sum(r * n for r, n in zip(scaled, sizes)) / sum(sizes)
    return [average - (r - mean) for r in scaled]
