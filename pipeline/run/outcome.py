"""PruneOutcome: what pruning produced, published once by PruneCallback when calibration ends.

Every later stage (evaluation, export, the sparsity report, run metadata, quantisation) reads this object and
nothing of the callback that made it.  Get it with `pipeline.run.protocols.find_outcome(trainer)`.

    outcome = find_outcome(trainer)
    for name, layer in outcome.layers.items():          # the pruned nn.Linear modules, in model order
        mask = outcome.masks[name]                        # bool [out, in] on CPU, True = pruned
        outcome.targets[name], outcome.achieved[name]     # requested and reached fraction of zeros

`promise` says what the solver guarantees per layer, so that a report checks what the method promises:
  "row"     every row has exactly int(in_features · target) pruned weights (Wanda, SparseGPT, magnitude);
  "n:m"     N of every M consecutive inputs of each row;
  "layer"   the layer as a whole reaches its target up to one threshold per column block (the reference's
            magnitude and SparseGPT rules: one threshold over all rows, so rows vary);
  "about"   within 0.01 of the target over the layer (the reference's Wanda variant, alpha bisected).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch

PROMISES = ("row", "n:m", "layer", "about")


def _frozen(mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class PruneOutcome:
    method: str                                   # magnitude, wanda, sparsegpt, sink_wanda, sink_sparsegpt
    flavor: str                                   # "default" or "reference"
    solver: str                                   # the pruner that solved the masks (e.g. "Wanda", "ReferenceSparseGPT")
    mode: str                                     # "oneshot" or "sequential"
    sparsity: float                               # the requested average fraction of zeros (parameter-weighted)
    n_m: tuple[int, int] | None                   # the semi-structured pattern, None for unstructured
    promise: str                                  # what the solver guarantees per layer (see the module docstring)
    layers: Mapping[str, torch.nn.Linear]         # targeted layers, in model order (they hold the pruned weights)
    masks: Mapping[str, torch.Tensor]             # bool [out, in] on CPU, True = pruned
    targets: Mapping[str, float]                  # per-layer requested fraction of zeros
    updated: frozenset[str] = frozenset()         # layers whose surviving weights the solver changed (SparseGPT)
    solver_info: Mapping[str, Mapping] = field(default_factory=dict)  # per layer: damping, retries, loss, alpha …
    calibrated_pairs: tuple[tuple[int, int, int], ...] = ()           # (epoch, sample id, timestep index) counted
    expert_of: Mapping[str, str] = field(default_factory=dict)        # Linear inside an MoE expert -> the expert
    expert_tokens: Mapping[str, float] = field(default_factory=dict)  # expert -> calibration tokens routed to it
    dense_routers: tuple[str, ...] = ()                               # MoE routers left dense
    timings: Mapping[str, float] = field(default_factory=dict)        # calibration_s, prune_s
    settings: Mapping[str, object] = field(default_factory=dict)      # the callback's scalar settings, for run metadata

    def __post_init__(self):
        for name in ("layers", "masks", "targets", "solver_info", "expert_of", "expert_tokens", "timings", "settings"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        object.__setattr__(self, "updated", frozenset(self.updated))
        if self.promise not in PROMISES:
            raise ValueError(f"PruneOutcome.promise={self.promise!r}: use one of {', '.join(PROMISES)}")
        if set(self.masks) - set(self.layers) or set(self.targets) != set(self.layers):
            raise ValueError("PruneOutcome: masks must name targeted layers and every layer needs a target")

    @property
    def achieved(self) -> Mapping[str, float]:
        """Per layer: the fraction of the mask that is pruned (layers without a mask: 0)."""
        return _frozen({n: float(self.masks[n].float().mean()) if n in self.masks else 0.0 for n in self.layers})

    @property
    def average_target(self) -> float:
        """The per-layer targets averaged with each layer's parameter count as its weight."""
        sizes = {n: layer.weight.numel() for n, layer in self.layers.items()}
        return sum(self.targets[n] * sizes[n] for n in sizes) / max(sum(sizes.values()), 1)

    def summary(self) -> dict:
        """The JSON-friendly part (no tensors, no modules): what results.json records of the pruning."""
        out = {"method": self.method, "flavor": self.flavor, "solver": self.solver, "mode": self.mode,
               "sparsity": self.sparsity, "n_m": list(self.n_m) if self.n_m else None, "promise": self.promise,
               "calibrated_pairs": [list(p) for p in self.calibrated_pairs]}
        if self.expert_of:
            out["moe"] = {"expert_tokens": dict(sorted(self.expert_tokens.items())), "dense_routers": list(self.dense_routers)}
        return out
