"""Pruning methods as small objects with one interface, and the row-weighting policies they are given.

A pruner turns one Linear layer's calibration inputs into a statistic (`add`, per sample, into a
reduction slot of `callbacks/reduction.SlotSums`) and the summed statistic into a mask (`solve`):

    pruner = make_pruner("sink_wanda", sparsity=0.5)        # Wanda with SinkWeighting (pipeline/maths/flavors.py)
    w = pruner.weighting(sink_scores, attention_mask)        # [B, L] token weights, or None
    pruner.add(sums, name, sample_id, x_b, w_b)              # x_b [T, d_in], w_b [T]
    result = pruner.solve(weight, sums.total(name), 0.5)     # PruneResult(mask, weight, info); target None for N:M

flavor="reference" (Reference* classes below) computes what the paper's reference code computes, including its
calibration schedule (clean or noised inputs, one-shot or layer-sequential, per-sample mean sink scores).

Sink-awareness is a policy, not a method: `SinkWeighting` weights each token by 1 − sink score,
`PlainWeighting` by 1 (both 0 on padding).  A flavour (pipeline/maths/flavors.py) maps each method to one of these
classes, so a new variant is a new class here and a Flavor that names it.
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
    unstructured_promise = "row"  # what `solve` guarantees per layer, unstructured (pipeline/run/outcome.py PROMISES)
    variant_capable = False       # True: `use_variant` selects the reference's Wanda variant

    def __init__(self, sparsity: float | None, n_m: tuple[int, int] | None, weighting: PlainWeighting | None = None,
                 blocksize: int = 128, percdamp: float = 0.01, use_variant: bool = False):
        if use_variant and not (self.variant_capable and not n_m):
            raise ValueError("prune use_variant=true is the reference's Wanda variant: it needs method=wanda, "
                             "flavor=reference and an unstructured sparsity (no n_m)")
        self.use_variant = use_variant
        self.sparsity = None if n_m else sparsity
        self.n_m = n_m
        self.weighting = weighting or PlainWeighting()
        self.blocksize, self.percdamp = blocksize, percdamp

    @property
    def promise(self) -> str:
        """"n:m" for N:M patterns, else the solver's unstructured promise ("row", "layer" or "about")."""
        if self.n_m is not None:
            return "n:m"
        return "about" if self.use_variant else self.unstructured_promise

    def batch_values(self, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor | None:
        """Per-sample statistics of a whole [B, T, d] batch at once, when the method has a batched form."""
        return None

    def add(self, sums, name: str, sample_id: int, xb: torch.Tensor, wb: torch.Tensor | None, value=None) -> bool | torch.Tensor:
        """Add one sample's statistic (xb [T, d], wb [T] or None) to its slot; whether it is finite: a bool, or a 0-d
        bool tensor on the statistic's device that the caller reads (callbacks/layers.py FiniteChecks: one host
        synchronisation per batch, not one per layer)."""
        return True

    def solve(self, weight: torch.Tensor, stat: torch.Tensor | None, target: float | None) -> PruneResult:
        """The layer's mask (and updated weight) pruning the fraction `target` (None: the N:M pattern)."""
        return PruneResult(sp.select_mask(sp.magnitude_scores(weight.float()), target, self.n_m))

    def outlier_scores(self, weight: torch.Tensor, stat: torch.Tensor | None) -> torch.Tensor:
        """The Wanda score |W_ij|·‖X_j‖ from this pruner's statistic, for OWL's outlier ratios (allocation.py)."""
        if stat is None:
            raise ValueError(f"prune sparsity profile owl needs calibration statistics; method {self.method} has none "
                             "(use wanda, sparsegpt or their sink_ forms)")
        return sp.wanda_scores(weight.float(), self.feature_sq_sums(stat).to(weight.device))

    def feature_sq_sums(self, stat: torch.Tensor) -> torch.Tensor:
        """Σ_t (w_t x_tj)² per input feature from the summed statistic."""
        return stat

    @staticmethod
    def score_term(scores: torch.Tensor) -> torch.Tensor:
        """A timestep's sink scores as summed into a sample's mean over the timesteps (`mean_scores`)."""
        return scores

    @staticmethod
    def mean_score(total: torch.Tensor, count: int) -> torch.Tensor:
        """The mean sink scores of a sample from the sum of its `count` timesteps' score terms."""
        return total / count


class Dense(Pruner):
    """Prunes nothing: a recipe's calibration and export for the dense model (e.g. quantized alone, callbacks/quantize.py)."""
    method = "dense"

    def solve(self, weight, stat, target):
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
        return torch.isfinite(value).all()

    def solve(self, weight, stat, target):
        return PruneResult(sp.select_mask(sp.wanda_scores(weight.float(), stat.to(weight.device)), target, self.n_m))


class SparseGPT(Pruner):
    """OBS solve on the Hessian Σ_t (w_t x_t)(w_t x_t)ᵀ; updates the surviving weights."""
    method, statistic = "sparsegpt", "hessian"

    def add(self, sums, name, sample_id, xb, wb, value=None):
        d = xb.shape[-1]
        acc = sums.accumulator(name, sample_id, (d, d), device=xb.device)
        sp.add_sample_hessian_(acc, xb, wb)
        return torch.isfinite(acc.diagonal()).all()  # NaN/Inf anywhere in x reaches H_jj = Σ x_j²

    def solve(self, weight, stat, target):
        new_weight, mask, info = sp.sparsegpt_prune(weight, stat.to(weight.device), sparsity=target, n_m=self.n_m,
                                                    blocksize=self.blocksize, percdamp=self.percdamp)
        return PruneResult(mask, new_weight, info)

    def feature_sq_sums(self, stat):
        return stat.diagonal()  # H_jj = Σ_t (w_t x_tj)²


# --- flavor="reference": what github.com/VILA-Lab/Sink-Aware-Pruning computes (docs/reference.md) -------------
# A flavour also says how PruneCallback calibrates it: `mode` (None: the user's), `inputs` ("noised" x_t at every
# timestep, or "clean" x_0 once per sample) and `mean_scores` (the calibration epoch averages each sample's sink
# scores over the timesteps, s̄, which then weights the inputs by 1 − s̄).  Clean inputs, or s̄, need nothing of
# the partly pruned model: PruneCallback then calibrates block by block from cached block inputs
# (callbacks/cached.py).

class ReferenceMagnitude(Pruner):
    """The reference's `prune_magnitude`: one |W| threshold per layer (rows vary); N:M per group."""
    flavor, unstructured_promise = "reference", "layer"

    def solve(self, weight, stat, target):
        return PruneResult(rf.layerwise_magnitude_mask(weight, target, self.n_m))


class ReferenceWanda(Wanda):
    """The reference's `prune_wanda`: clean windows, layer-sequential; |W|·√(Σ x²) with a stable per-row sort
    (= its √mean: the same ranking)."""
    flavor, mode, inputs = "reference", "sequential", "clean"
    variant_capable = True

    def solve(self, weight, stat, target):
        if not self.use_variant:
            return super().solve(weight, stat, target)
        mask, alpha = rf.wanda_variant_mask(sp.wanda_scores(weight.float(), stat.to(weight.device)), target)
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
        return torch.isfinite(value).all()

    def solve(self, weight, stat, target):
        metric = weight.float().abs() * stat.to(weight.device, torch.float32).reshape(1, -1)
        if self.n_m is not None:
            return PruneResult(sp.select_mask(metric, None, self.n_m))
        return PruneResult(rf.lowest_by_topk(metric, int(metric.shape[1] * target)))

    def feature_sq_sums(self, stat):
        return stat.double() ** 2  # the metric is |W|·Σ‖x⊙(1 − s)‖₂: its square root of the square ranks the same


class ReferenceSparseGPT(SparseGPT):
    """The reference's `prune_sparsegpt`: clean windows, layer-sequential; SparseGPT's running-average float32 Hessian
    (one window at a time, a running mean per reduction slot) and its `fasterprune` (pipeline/maths/reference.py: one
    threshold per 128-column block over all rows, damping percdamp · mean diag).  With one slot, the reference's bits."""
    flavor, mode, inputs = "reference", "sequential", "clean"
    threshold = "block"  # fasterprune's unstructured rule ("row": the same count from every row, an ablation)

    @property
    def unstructured_promise(self) -> str:
        return "layer" if self.threshold == "block" else "row"

    def add(self, sums, name, sample_id, xb, wb, value=None):
        d = xb.shape[-1]
        acc, seen = sums.running(name, sample_id, (d, d), device=xb.device)
        rf.add_running_hessian_(acc, seen, xb, wb)
        return torch.isfinite(acc.diagonal()).all()

    def solve(self, weight, stat, target):
        new_weight, mask, info = rf.fasterprune(weight, stat.to(weight.device), sparsity=target, n_m=self.n_m,
                                                blocksize=self.blocksize, percdamp=self.percdamp, threshold=self.threshold)
        return PruneResult(mask, new_weight, info)


class ReferenceSinkSparseGPT(ReferenceSparseGPT):
    """The reference's `prune_sink_sparsegpt`: s̄ = each sample's sink scores averaged over the timesteps (collected
    in the calibration epoch), then ReferenceSparseGPT with H from the clean inputs weighted by 1 − s̄.  The average
    is Σ_t score_term(s_t) / n turned into a score by mean_score (the reference: s itself and the plain mean)."""
    mean_scores = True


def check_prune_args(method, sparsity, n_m_text, n_m, mode, blocksize, percdamp, reduction_slots) -> None:
    if method not in METHODS:
        raise ValueError(f"prune method={method!r} is unknown; choose one of {', '.join(METHODS)}")
    if method == "dense" and (n_m is not None or sparsity):
        raise ValueError(f"prune method=dense prunes nothing; drop sparsity={sparsity} / n_m={n_m_text} or choose a pruning method")
    if n_m is not None and sparsity is not None and not isinstance(sparsity, (int, float)):
        raise ValueError(f"prune n_m={n_m_text} prunes every layer alike; per-layer sparsity ({sparsity!r}) needs "
                         "unstructured pruning: drop n_m or give sparsity as a number")
    if n_m is not None and sparsity is not None and sparsity != n_m[0] / n_m[1]:
        raise ValueError(f"prune sparsity={sparsity} disagrees with n_m={n_m_text} (= {n_m[0] / n_m[1]}); drop sparsity or set it to N/M")
    if mode not in ("oneshot", "sequential"):
        raise ValueError(f"prune mode={mode!r} is unknown; use 'oneshot' or 'sequential'")
    for name, value in (("reduction_slots", reduction_slots), ("blocksize", blocksize)):
        if (value is not None or name == "blocksize") and (not isinstance(value, int) or value < 1):
            raise ValueError(f"prune {name}={value!r} must be an integer >= 1 (default {128 if name == 'blocksize' else 8})")
    if not (isinstance(percdamp, (int, float)) and 0.0 <= percdamp < 1.0):
        raise ValueError(f"prune percdamp={percdamp!r} must be in [0, 1): the Hessian damping as a fraction of its mean diagonal (default 0.01)")
