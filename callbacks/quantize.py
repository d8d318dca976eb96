"""QuantizeCallback: weight-only quantization after pruning (GPTQ int4 per group, or FP8 per channel), joint with the
masks, on the same calibration windows and timesteps (maths: pipeline/maths/gptq.py, pipeline/maths/quantize.py).

List it after PruneCallback (it quantizes the layers PruneCallback pruned, reading their masks when calibration ends)
and before EvaluateExportCallback (which scores the quantized model and saves it in the compressed-tensors format).
With `method: dense` (PruneCallback, nothing pruned) it quantizes the dense model.

GPTQ's Hessian is SparseGPT's statistic: Σ (w_t x_t)(w_t x_t)ᵀ over every (window, timestep), rows weighted by 1 − sink
score when the pruning method is sink-aware, summed in DDP-exact reduction slots (callbacks/reduction.py) so the
quantized weights are identical for any world size.  It is taken on the dense model's inputs, in the calibration epoch
(one-shot, as SparseGPT's one-shot mode), from a hooked forward of its own on each noised batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from typing_extensions import override

from callbacks.layers import accumulate, routed_tokens
from callbacks.prune import PruneCallback
from callbacks.reduction import SlotSums, check_slots
from callbacks.schedule import hooked_forward
from callbacks.shared import SharedInputs
from callbacks.sink_stats import SinkStatsCallback
from pipeline.maths.gptq import gptq_quantize
from pipeline.maths.flavors import make_pruner
from pipeline.maths.quantize import Scheme, round_to_nearest
from pipeline.model.fused_experts import UnfusedExperts
from pipeline.run.phase import phase
from pipeline.run.protocols import (ChecksContracts, NoisedBatch, NoisedBatchHooks, SavesModel, SinkScoreConsumer, callbacks_of,
                                    find_outcome, run_flavor)


@dataclass(frozen=True)
class QuantizeOutcome:
    """What QuantizeCallback did, for the scoring and the compressed-tensors save (pipeline/run/compressed.py)."""
    scheme: Scheme
    algorithm: str                                # "gptq" or "rtn"
    scales: Mapping[str, torch.Tensor]            # layer -> [out, groups] scales (CPU, the layer's dtype)
    info: Mapping[str, Mapping] = field(default_factory=dict)  # layer -> GPTQ damping, retries, loss
    timings: Mapping[str, float] = field(default_factory=dict)
    saved_dense: frozenset[str] = frozenset()     # quantized in memory, saved dense: fused MoE experts

    @property
    def packed_scales(self) -> dict[str, torch.Tensor]:
        """The layers saved packed, with their scales (pipeline/run/compressed.py)."""
        return {n: s for n, s in self.scales.items() if n not in self.saved_dense}

    def __post_init__(self):
        object.__setattr__(self, "scales", MappingProxyType(dict(self.scales)))
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))
        object.__setattr__(self, "timings", MappingProxyType(dict(self.timings)))


class QuantizeCallback(Callback, NoisedBatchHooks, SinkScoreConsumer, ChecksContracts):
    """Quantize the pruned layers' weights in place (the pruned weights stay exactly zero).

    Args:
        scheme: "w4a16" (int4 weights, symmetric, one scale per group of `group_size` inputs; GPTQ) or "fp8"
            (float8_e4m3fn weights, one scale per output channel; rounded to nearest unless gptq: true).
        bits: 4 or 8, another way to name the scheme (4: w4a16, 8: fp8).
        group_size: inputs per int4 scale (default 128; null: one scale per output channel).
        actorder: GPTQ visits columns by decreasing Hessian diagonal (static groups: the saved format needs no g_idx).
        gptq: GPTQ (True) or round to nearest (False); default True for w4a16, False for fp8.
        blocksize / percdamp: GPTQ's lazy-update block and Hessian damping (fraction of the mean diagonal).
        sink_aware: weight the Hessian's rows by 1 − sink score; default: as the pruning method (sink_*).
        reduction_slots: slots for DDP-exact sums (default as PruneCallback's).
        eager: hooked forwards in torch.compile's "force_eager" stance.
    """

    def __init__(self, scheme: str | None = None, bits: int | None = None, group_size: int | None = 128,
                 actorder: bool = False, gptq: bool | None = None, blocksize: int = 128, percdamp: float = 0.01,
                 sink_aware: bool | None = None, reduction_slots: int | None = None, eager: bool = True):
        self.scheme = Scheme.parse(scheme, bits, group_size, actorder)
        self.gptq = (not self.scheme.is_float) if gptq is None else bool(gptq)
        if actorder and not self.gptq:
            raise ValueError("quantize actorder=true orders GPTQ's columns; it needs gptq: true (fp8 rounds to nearest by default)")
        if not (isinstance(blocksize, int) and blocksize >= 1):
            raise ValueError(f"quantize blocksize={blocksize!r} must be an integer >= 1 (default 128)")
        if not (isinstance(percdamp, (int, float)) and 0.0 <= percdamp < 1.0):
            raise ValueError(f"quantize percdamp={percdamp!r} must be in [0, 1): the Hessian damping as a fraction of its mean diagonal (default 0.01)")
        if reduction_slots is not None and not (isinstance(reduction_slots, int) and reduction_slots >= 1):
            raise ValueError(f"quantize reduction_slots={reduction_slots!r} must be an integer >= 1 (default 8)")
        self.blocksize, self.percdamp, self.sink_aware = blocksize, percdamp, sink_aware
        self.reduction_slots, self.eager = reduction_slots, eager
        self.prune: PruneCallback | None = None
        self.layers: dict[str, torch.nn.Linear] = {}
        self.statistic = None  # a SparseGPT pruner: its weighting and Hessian `add` (pipeline/maths/pruners.py)
        self.sums, self.shared, self.seen = None, SharedInputs(), set()
        self.saved_dense: frozenset[str] = frozenset()
        self.outcome: QuantizeOutcome | None = None

    @override
    def check_contracts(self, trainer, pl_module) -> None:
        before = trainer.callbacks[:trainer.callbacks.index(self)]
        if not any(isinstance(cb, PruneCallback) for cb in before):
            raise ValueError("QuantizeCallback needs a PruneCallback listed before it in trainer.callbacks (method: dense "
                             "quantizes the dense model)")
        if self._sink_aware(before) and self.gptq and not any(isinstance(cb, SinkStatsCallback) for cb in before):
            raise ValueError("quantize sink_aware=true needs a SinkStatsCallback listed before QuantizeCallback in trainer.callbacks")
        if any(isinstance(cb, SavesModel) and cb.save_model for cb in trainer.callbacks):  # the writer, before any work
            from pipeline.run.compressed import require_compressed_tensors

            require_compressed_tensors()
        check_slots(run_flavor(trainer).slots(self.reduction_slots, trainer.world_size), trainer.world_size,
                    "quantize reduction_slots")

    def _sink_aware(self, before: list) -> bool:
        """sink_aware, by default the PruneCallback's weighting."""
        prune = next(cb for cb in before if isinstance(cb, PruneCallback))
        return prune.pruner.weighting.sink_aware if self.sink_aware is None else self.sink_aware

    @override
    def setup(self, trainer, pl_module, stage=None) -> None:
        self.check_contracts(trainer, pl_module)
        before = trainer.callbacks[:trainer.callbacks.index(self)]
        self.prune = next(cb for cb in before if isinstance(cb, PruneCallback))
        self.sink_aware = self._sink_aware(before)
        self.reduction_slots = run_flavor(trainer).slots(self.reduction_slots, trainer.world_size)

    def quantized_layers(self, model, pruned: dict) -> dict:
        """The layers it quantizes: every pruned layer (fused MoE experts and tied layers included); a one-line error
        for a width the group size does not divide.  Preflight runs it on the model's skeleton."""
        layers = dict(pruned)
        for name, layer in layers.items():
            self.scheme.check_width(name, layer.in_features)
        return layers

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        """The pruned layers (known once the model exists); every width checked before any calibration work."""
        self.layers = self.quantized_layers(pl_module.model, self.prune.layers)
        self.saved_dense = frozenset(fused_expert_layers(pl_module.model, self.layers))
        if self.saved_dense and trainer.is_global_zero:  # one line at run start
            Console(stderr=True).print(
                f"quantize: {len(self.saved_dense)} fused MoE expert layers are quantized like the others but saved dense "
                "(their exact quantized values): compressed-tensors packs Linear weights only, and "
                f"{type(pl_module.model).__name__} loads its experts as fused 3-D tensors",
                style="yellow", soft_wrap=True, markup=False)
        if self.gptq:
            self.statistic = make_pruner("sink_sparsegpt" if self.sink_aware else "sparsegpt", 0.0)
            self.sums = self.sums or SlotSums(self.reduction_slots)
            self.shared = SharedInputs.find(pl_module, self.layers, self.prune.t.block_modules[-1], self.eager)

    @override
    def wants_sink_scores(self, epoch: int) -> bool:  # SinkStatsCallback probes only when a consumer wants them
        return bool(self.gptq and self.sink_aware and epoch == 0)

    @override
    def weights_by_sink_scores(self) -> bool:  # sink-aware GPTQ (round-to-nearest reads no statistic)
        return bool(self.gptq and self.sink_aware)

    @override
    def reads_probed_forward(self, epoch: int) -> bool:  # its own hooked forward reads the layer inputs
        return False

    @override
    def on_noised_batch(self, trainer, pl_module, nb: NoisedBatch) -> None:
        if self.gptq and trainer.current_epoch == 0:
            self._accumulate(pl_module, nb)

    def _accumulate(self, pl_module, nb: NoisedBatch) -> None:
        fresh = [sid >= 0 and (sid, nb.step) not in self.seen for sid in nb.sample_ids]  # -1: DDP padding
        if not any(fresh):
            return
        experts = self.prune.t.experts

        def add(name, x):
            if not self.shared.is_copy(name, x):
                accumulate(self.statistic, self.sums, name, x, routed_tokens(experts, name), nb, fresh)

        with torch.no_grad():
            hooked_forward(pl_module, self.layers, list(self.layers), add, nb.input_ids, nb.attention_mask,
                           self.prune.t.block_modules[-1], self.eager)
        self.seen.update((sid, nb.step) for sid, f in zip(nb.sample_ids, fresh) if f)

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        """PruneCallback has published its PruneOutcome (its on_train_end runs first): quantize the pruned layers, joint
        with their masks."""
        self._quantize(find_outcome(trainer))

    def _quantize(self, outcome) -> None:
        t0 = time.time()
        missing = sorted(set(self.layers) - set(outcome.layers))
        if missing:
            raise RuntimeError(f"quantize: {missing[0]} is not among the PruneOutcome's layers; the pruning changed its targets")
        masks, scales, info = outcome.masks, {}, {}
        names = list(self.layers)
        self.shared.release()
        stats = self.sums.take_each(names, self.shared.key) if self.gptq else ((n, None) for n in names)
        with torch.no_grad(), phase(f"quantizing ({self.scheme.name}, {'GPTQ' if self.gptq else 'round to nearest'})"):
            for name, hessian in stats:
                weight = self.layers[name].weight
                mask = masks.get(name)
                mask = None if mask is None else mask.to(weight.device)
                if self.gptq:
                    if hessian is None:
                        raise RuntimeError(f"quantize: no calibration statistics reached {name}; the layer never ran in the calibration forward")
                    new, scale, info[name] = gptq_quantize(weight, hessian, self.scheme, mask, self.blocksize, self.percdamp)
                else:
                    scale, new = round_to_nearest(weight if mask is None else weight.masked_fill(mask, 0), self.scheme)
                weight.copy_(new)
                scales[name] = scale.cpu()
        if self.sums is not None:
            self.sums.clear()
        self.outcome = QuantizeOutcome(self.scheme, "gptq" if self.gptq else "rtn", scales, info,
                                       {"quantize_s": time.time() - t0}, self.saved_dense)

    @override
    def state_dict(self) -> dict:
        return {"sums": self.sums.state_dict() if self.sums else None, "seen": sorted(self.seen)}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.seen = {tuple(k) for k in state_dict.get("seen", [])}
        if state_dict.get("sums") is not None:
            self.sums = SlotSums(self.reduction_slots or state_dict["sums"]["slots"])
            self.sums.load_state_dict(state_dict["sums"])


def fused_expert_layers(model, layers: dict) -> list[str]:
    """Targeted Linears inside fused MoE experts that load_dlm split per expert (pipeline/model/fused_experts.py)."""
    def parent(name: str, up: int):
        return model.get_submodule(name.rsplit(".", up)[0]) if name.count(".") >= up else None
    return [n for n in layers if isinstance(parent(n, 2), UnfusedExperts)]


def quantize_outcome(trainer) -> QuantizeOutcome | None:
    """The run's QuantizeOutcome (None: nothing quantized); read in on_train_end, after QuantizeCallback's."""
    return next((cb.outcome for cb in callbacks_of(trainer, QuantizeCallback)), None)


def quantize_summary(outcome: QuantizeOutcome) -> dict:
    """results.json's "quantize" entry."""
    s = outcome.scheme
    return {"scheme": s.name, "bits": s.bits, "group_size": s.group_size, "actorder": s.actorder,
            "algorithm": outcome.algorithm, "layers": len(outcome.scales), "saved_dense": len(outcome.saved_dense),
            "gptq": dict(outcome.info)}
