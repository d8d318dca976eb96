"""Flavours: every choice that makes a run compute what this project computes, or what the paper's reference code
computes (github.com/VILA-Lab/Sink-Aware-Pruning, docs/reference.md), made in one place.

    flavor = get_flavor("reference-exact")
    flavor.noise_order          # "per_sample" (hashed per (sample, t): DDP-exact) or "reference" (one stream, in order)
    flavor.sink_scores(mass, 2.0, 5.0, valid)   # the attention-mass and sink-score operations (reference_mass)
    flavor.slots(None, world_size)              # default reduction slots (1: the reference's one running statistic)
    make_pruner("sink_wanda", 0.5, flavor="reference")   # the pruner variant (pipeline/maths/pruners.py)

  "default"          this project's: per-sample noise, fp32 chunked mass, per-row rules, 8 reduction slots.
  "reference"        the reference's pruners and calibration schedule (pruners.Reference*), with this project's noise
                     and mass: masks the same on any number of DDP ranks.
  "reference-exact"  also the reference's noise order, its mass and score operations and one reduction slot: in one
                     process at batch size 1, its masks and weights bit for bit (benchmarks/vs_reference.py).

A variant for an ablation is a new Flavor registered under its own name (`register(replace(REFERENCE, ...))`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch

from pipeline.maths import reference
from pipeline.maths import pruners as pr
from pipeline.maths.sinks import sink_scores

DEFAULT_SLOTS = 8


@dataclass(frozen=True)
class Flavor:
    name: str
    pruners: Mapping[str, type[pr.Pruner]]   # method, or its base without sink_, -> the pruner class
    noise_order: str = "per_sample"          # "per_sample" or "reference" (DLMModule's noise)
    reference_mass: bool = False             # the reference's attention-mass and sink-score operations
    single_slot: bool = False                # one reduction slot in a single process

    def pruner_class(self, method: str) -> type[pr.Pruner] | None:
        """A sink-specific variant first ("sink_sparsegpt"), else the base method's ("sparsegpt")."""
        return self.pruners.get(method) or self.pruners.get(method.removeprefix("sink_"))

    def slots(self, slots: int | None, world_size: int) -> int:
        """The user's reduction slots, else 8; 1 in one process when the flavour keeps one running statistic."""
        return slots or (1 if self.single_slot and world_size == 1 else DEFAULT_SLOTS)

    def sink_scores(self, mass: torch.Tensor, std: float, alpha: float, valid: torch.Tensor | None) -> torch.Tensor:
        """[B, L] sink scores from the attention mass; the reference's own operations where there is no padding."""
        if self.reference_mass and (valid is None or bool(valid.all())):
            return reference.collector_sink_scores(mass, std, alpha)
        return sink_scores(mass, k=std, alpha=alpha, valid=valid)


DEFAULT = Flavor("default", {"magnitude": pr.Pruner, "wanda": pr.Wanda, "sparsegpt": pr.SparseGPT, "dense": pr.Dense})
REFERENCE = Flavor("reference", {
    "dense": pr.Dense, "magnitude": pr.ReferenceMagnitude, "wanda": pr.ReferenceWanda, "sink_wanda": pr.ReferenceSinkWanda,
    "sparsegpt": pr.ReferenceSparseGPT, "sink_sparsegpt": pr.ReferenceSinkSparseGPT})
REFERENCE_EXACT = Flavor("reference-exact", REFERENCE.pruners, noise_order="reference", reference_mass=True,
                         single_slot=True)
FLAVORS: dict[str, Flavor] = {f.name: f for f in (DEFAULT, REFERENCE, REFERENCE_EXACT)}


def register(flavor: Flavor) -> Flavor:
    FLAVORS[flavor.name] = flavor
    return flavor


def with_noise_order(name: str, noise_order: str) -> str:
    """The name of flavour `name` with the other noise order (and, with it, the matching mass operations and slots),
    registered on first use: for ablations that switch the noise alone."""
    base = get_flavor(name)
    if base.noise_order == noise_order:
        return name
    exact = noise_order == "reference"
    wanted = replace(base, name=f"{name}+{noise_order}-noise", noise_order=noise_order, reference_mass=exact, single_slot=exact)
    same = next((f for f in FLAVORS.values() if replace(f, name=wanted.name) == wanted), None)  # reference -> reference-exact
    return (same or register(wanted)).name


def get_flavor(name: str | Flavor) -> Flavor:
    if isinstance(name, Flavor):
        return name
    if name not in FLAVORS:
        raise ValueError(f"prune flavor={name!r} is unknown; choose one of {', '.join(FLAVORS)}")
    return FLAVORS[name]


def make_pruner(method: str, sparsity: float | None, n_m=None, flavor: str | Flavor = "default", **kwargs) -> pr.Pruner:
    """`method` as users write it ("sink_wanda" = Wanda with SinkWeighting); the flavour picks the class."""
    cls = get_flavor(flavor).pruner_class(method)
    if cls is None:
        raise ValueError(f"prune method={method!r} is unknown for flavor {get_flavor(flavor).name}; choose one of "
                         f"{', '.join(pr.METHODS)} (flavor default has each)")
    weighting = pr.SinkWeighting() if method.startswith("sink_") else pr.PlainWeighting()
    return cls(sparsity, n_m, weighting, **kwargs)
