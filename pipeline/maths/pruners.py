"""Pruning methods as small objects with one interface, and the row-weighting policies they are given.

A pruner turns one Linear layer's calibration inputs into a statistic (`add`, per sample, into a
reduction slot of `callbacks/reduction.SlotSums`) and the summed statistic into a mask (`solve`):

    pruner = make_pruner("sink_wanda", sparsity=0.5)        # Wanda with SinkWeighting
    w = pruner.weighting(sink_scores, attention_mask)        # [B, L] token weights, or None
    pruner.add(sums, name, sample_id, x_b, w_b)              # x_b [T, d_in], w_b [T]
    result = pruner.solve(weight, sums.total(name))          # PruneResult(mask, weight, info)

flavor="reference" (Reference* classes below) computes what the paper's reference code computes, including its
calibration schedule (clean or noised inputs, one-shot or layer-sequential, per-sample mean sink scores).

Sink-awareness is a policy, not a method: `SinkWeighting` weights each token by 1 − sink score,
`PlainWeighting` by 1 (both 0 on padding).  A *flavour* is a variant of a pruner (a subclass registered
under (method, flavour) in FLAVORS), so a new one is a new class here and nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.maths import reference as rf
from pipeline.maths import sparsity as sp

METHODS = ("magnitude", "wanda", "sparsegpt", "sink_wanda", "sink_sparsegpt", "dense")


# --- row weighting ---------------------------------------------------------------------------------------

class PlainWeighting:
    """Every real token weighs 1; padding 0 (None when there is no padding: the unweighted statistic)."""
    sink_aware = False

    def __call__(self, sink_scores: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        return None if attention_mask is None else attention_mask.float()


class SinkWeighting(PlainWeighting):
    """A token weighs 1 − its sink score (sink scores [B, L] from SinkStatsCallback); padding 0."""
    sink_aware = True

    def __call__(self, sink_scores, attention_mask):
        if sink_scores is None:
            raise RuntimeError("sink-aware pruning: no sink scores on the batch; list SinkStatsCallback before PruneCallback")
        weights = 1.0 - sink_scores.float()
        return weights if attention_mask is None else weights * attention_mask.float()


# --- pruners ---------------------------------------------------------------------------------------------

@dataclass
class PruneResult:
    mask: torch.Tensor                  # bool [out, in], True = pruned
    weight: torch.Tensor | None = None  # the updated weight (SparseGPT), None when only the mask changes
    info: dict = field(default_factory=dict)


class Pruner:
    """Magnitude pruning; the base of every method.  `sparsity` is None for N:M patterns."""
    method = "magnitude"
    statistic: str | None = None  # what `add` accumulates: None, "act_sq_sum", "act_norm_sum" or "hessian"
    flavor = "default"
    mode: str | None = None       # the calibration mode the flavour imposes (None: PruneCallback's `mode`)
    inputs = "noised"             # "noised": x_t at every timestep; "clean": x_0, once per sample
    mean_scores = False           # True: the calibration epoch averages each sample's sink scores over the timesteps

    def __init__(self, sparsity: float | None, n_m: tuple[int, int] | None, weighting: PlainWeighting | None = None,
                 blocksize: int = 128, percdamp: float = 0.01, use_variant: bool = False):
        if use_variant and not (getattr(self, "variant_capable", False) and not n_m):
            raise ValueError("prune use_variant=true is the reference's Wanda variant: it needs method=wanda, "
                             "flavor=reference and an unstructured sparsity (no n_m)")
        self.use_variant = use_variant
        self.sparsity = None if n_m else sparsity
        self.n_m = n_m
        self.weighting = weighting or PlainWeighting()
        self.blocksize, self.percdamp = blocksize, percdamp

    def batch_values(self, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor | None:
        """Per-sample statistics of a whole [B, T, d] batch at once, when the method has a batched form."""
        return None

    def add(self, sums, name: str, sample_id: int, xb: torch.Tensor, wb: torch.Tensor | None, value=None) -> bool:
        """Add one sample's statistic (xb [T, d], wb [T] or None) to its slot; False if it is not finite."""
        return True

    def solve(self, weight: torch.Tensor, stat: torch.Tensor | None) -> PruneResult:
        return PruneResult(sp.select_mask(sp.magnitude_scores(weight.float()), self.sparsity, self.n_m))


class Dense(Pruner):
    """Prunes nothing: a recipe's calibration and export for the dense model (e.g. quantized alone, callbacks/quantize.py)."""
    method = "dense"

    def solve(self, weight, stat):
        return PruneResult(torch.zeros(weight.shape, dtype=torch.bool))


class Wanda(Pruner):
    """|W|·‖X_j‖₂ with ‖X_j‖² = Σ_t (w_t x_tj)² per input feature."""
    method, statistic = "wanda", "act_sq_sum"

    def batch_values(self, x, weights):
        return sp.sample_act_sq_sums(x, weights)

    def add(self, sums, name, sample_id, xb, wb, value=None):
        if value is None:
            value = self.batch_values(xb[None], None if wb is None else wb[None])[0]
        sums.add(name, sample_id, value)
        return bool(torch.isfinite(value).all())

    def solve(self, weight, stat):
        return PruneResult(sp.select_mask(sp.wanda_scores(weight.float(), stat.to(weight.device)), self.sparsity, self.n_m))


class SparseGPT(Pruner):
    """OBS solve on the Hessian Σ_t (w_t x_t)(w_t x_t)ᵀ; updates the surviving weights."""
    method, statistic = "sparsegpt", "hessian"

    def add(self, sums, name, sample_id, xb, wb, value=None):
        d = xb.shape[-1]
        acc = sums.accumulator(name, sample_id, (d, d), device=xb.device)
        sp.add_sample_hessian_(acc, xb, wb)
        return bool(torch.isfinite(acc.diagonal()).all())  # NaN/Inf anywhere in x reaches H_jj = Σ x_j²

    def solve(self, weight, stat):
        new_weight, mask, info = sp.sparsegpt_prune(weight, stat.to(weight.device), sparsity=self.sparsity, n_m=self.n_m,
                                                    blocksize=self.blocksize, percdamp=self.percdamp)
        return PruneResult(mask, new_weight, info)


# --- flavor="reference": what github.com/VILA-Lab/Sink-Aware-Pruning computes (docs/reference.md) -------------
# A flavour also says how PruneCallback calibrates it: `mode` (None: the user's), `inputs` ("noised" x_t at every
# timestep, or "clean" x_0 once per sample) and `mean_scores` (the calibration epoch averages each sample's sink
# scores over the timesteps, s̄, which then weights the inputs by 1 − s̄).  Clean inputs, or s̄, need nothing of
# the partly pruned model: PruneCallback then calibrates block by block from cached block inputs
# (callbacks/cached.py).

class ReferenceMagnitude(Pruner):
    """The reference's `prune_magnitude`: one |W| threshold per layer (rows vary); N:M per group."""
    flavor = "reference"

    def solve(self, weight, stat):
        return PruneResult(rf.layerwise_magnitude_mask(weight, self.sparsity, self.n_m))


class ReferenceWanda(Wanda):
    """The reference's `prune_wanda`: clean windows, layer-sequential; |W|·√(Σ x²) with a stable per-row sort
    (= its √mean: the same ranking)."""
    flavor, mode, inputs = "reference", "sequential", "clean"
    variant_capable = True

    def solve(self, weight, stat):
        if not self.use_variant:
            return super().solve(weight, stat)
        mask, alpha = rf.wanda_variant_mask(sp.wanda_scores(weight.float(), stat.to(weight.device)), self.sparsity)
        return PruneResult(mask, info={"alpha": alpha})


class ReferenceSinkWanda(Wanda):
    """The reference's `prune_sink`: one-shot on the dense model over the noised batches; the statistic is
    Σ over (sample, timestep) of ‖x ⊙ (1 − s)‖₂ per input feature (a sum of norms, not the root of a sum of
    squares), the mask on |W|·Σ (no square root).  As the reference computes it: (1 − s) multiplied in the model's
    dtype, `torch.norm` over the window's rows in float32, added into a float32 sum in order, the mask by `topk`
    (pipeline/maths/reference.py).  The reference takes one norm per (batch, timestep) over the batch's B·T rows; we
    take one per (sample, timestep) so that sums stay exact across DDP world sizes: the same thing at its batch size 1,
    the reference at batch 1 otherwise.  The reference ignores N:M here (always unstructured per row); this flavour
    honours N:M."""
    flavor, mode, inputs = "reference", "oneshot", "noised"
    statistic = "act_norm_sum"

    def batch_values(self, x, weights):
        return torch.stack([rf.window_norms(x[b], None if weights is None else weights[b]) for b in range(len(x))])

    def add(self, sums, name, sample_id, xb, wb, value=None):
        if value is None:
            value = rf.window_norms(xb, wb)
        sums.accumulator(name, sample_id, value.shape, device=value.device).add_(value)  # float32, in order
        return bool(torch.isfinite(value).all())

    def solve(self, weight, stat):
        metric = weight.float().abs() * stat.to(weight.device, torch.float32).reshape(1, -1)
        if self.n_m is not None:
            return PruneResult(sp.select_mask(metric, None, self.n_m))
        return PruneResult(rf.lowest_by_topk(metric, int(metric.shape[1] * self.sparsity)))


class ReferenceSparseGPT(SparseGPT):
    """The reference's `prune_sparsegpt`: clean windows, layer-sequential; SparseGPT's running-average float32 Hessian
    (one window at a time, a running mean per reduction slot) and its `fasterprune` (pipeline/maths/reference.py: one
    threshold per 128-column block over all rows, damping percdamp · mean diag).  With one slot, the reference's bits."""
    flavor, mode, inputs = "reference", "sequential", "clean"
    threshold = "block"  # fasterprune's unstructured rule ("row": the same count from every row, an ablation)

    def add(self, sums, name, sample_id, xb, wb, value=None):
        d = xb.shape[-1]
        acc, seen = sums.running(name, sample_id, (d, d), device=xb.device)
        rf.add_running_hessian_(acc, seen, xb, wb)
        return bool(torch.isfinite(acc.diagonal()).all())

    def solve(self, weight, stat):
        new_weight, mask, info = rf.fasterprune(weight, stat.to(weight.device), sparsity=self.sparsity, n_m=self.n_m,
                                                blocksize=self.blocksize, percdamp=self.percdamp, threshold=self.threshold)
        return PruneResult(mask, new_weight, info)


class ReferenceSinkSparseGPT(ReferenceSparseGPT):
    """The reference's `prune_sink_sparsegpt`: s̄ = each sample's sink scores averaged over the timesteps (collected
    in the calibration epoch), then ReferenceSparseGPT with H from the clean inputs weighted by 1 − s̄.  The average
    is Σ_t score_term(s_t) / n turned into a score by mean_score (the reference: s itself and the plain mean)."""
    mean_scores = True

    @staticmethod
    def score_term(scores: torch.Tensor) -> torch.Tensor:
        return scores

    @staticmethod
    def mean_score(total: torch.Tensor, count: int) -> torch.Tensor:
        return total / count


FLAVORS: dict[tuple[str, str], type[Pruner]] = {
    ("magnitude", "default"): Pruner, ("wanda", "default"): Wanda, ("sparsegpt", "default"): SparseGPT,
    ("magnitude", "reference"): ReferenceMagnitude, ("wanda", "reference"): ReferenceWanda,
    ("sink_wanda", "reference"): ReferenceSinkWanda, ("sparsegpt", "reference"): ReferenceSparseGPT,
    ("sink_sparsegpt", "reference"): ReferenceSinkSparseGPT,
    ("dense", "default"): Dense, ("dense", "reference"): Dense,
}


def make_pruner(method: str, sparsity: float | None, n_m=None, flavor: str = "default", **kwargs) -> Pruner:
    """`method` as users write it ("sink_wanda" = Wanda with SinkWeighting); `flavor` picks a variant."""
    if method not in METHODS:
        raise ValueError(f"prune method={method!r} is unknown; choose one of {', '.join(METHODS)}")
    base = method.removeprefix("sink_")
    cls = FLAVORS.get((method, flavor)) or FLAVORS.get((base, flavor))  # a sink-specific variant first
    if cls is None:
        known = sorted({f for m, f in FLAVORS if m in (base, method)})
        raise ValueError(f"prune flavor={flavor!r} is unknown for {base}; choose one of {', '.join(known)}")
    weighting = SinkWeighting() if method.startswith("sink_") else PlainWeighting()
    return cls(sparsity, n_m, weighting, **kwargs)


def check_prune_args(method, sparsity, n_m_text, n_m, mode, blocksize, percdamp, reduction_slots) -> None:
    if method not in METHODS:
        raise ValueError(f"prune method={method!r} is unknown; choose one of {', '.join(METHODS)}")
    if method == "dense" and (n_m is not None or sparsity):
        raise ValueError(f"prune method=dense prunes nothing; drop sparsity={sparsity} / n_m={n_m_text} or choose a pruning method")
    if n_m is None and not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"prune sparsity={sparsity!r} must be in [0, 1); e.g. 0.5 for 50%")
    if n_m is not None and sparsity is not None and sparsity != n_m[0] / n_m[1]:
        raise ValueError(f"prune sparsity={sparsity} disagrees with n_m={n_m_text} (= {n_m[0] / n_m[1]}); drop sparsity or set it to N/M")
    if mode not in ("oneshot", "sequential"):
        raise ValueError(f"prune mode={mode!r} is unknown; use 'oneshot' or 'sequential'")
    for name, value in (("reduction_slots", reduction_slots), ("blocksize", blocksize)):
        if (value is not None or name == "blocksize") and (not isinstance(value, int) or value < 1):
            raise ValueError(f"prune {name}={value!r} must be an integer >= 1 (default {128 if name == 'blocksize' else 8})")
    if not (isinstance(percdamp, (int, float)) and 0.0 <= percdamp < 1.0):
        raise ValueError(f"prune percdamp={percdamp!r} must be in [0, 1): the Hessian damping as a fraction of its mean diagonal (default 0.01)")
