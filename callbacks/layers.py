"""The layers PruneCallback prunes (every Linear inside the transformer blocks, filtered) and how their
per-sample statistics are gathered.

`targets` / `ignore` are regexes on full module names.  MoE routers (callbacks/moe.py) stay dense unless
a `targets` pattern names them; a Linear inside an expert is recorded with its expert, whose routed
tokens the statistics need.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning.pytorch.utilities import rank_zero_warn

from callbacks import moe
from pipeline.maths import allocation
from pipeline.maths import sparsity as sp
from pipeline.model.calibration import find_blocks


def compile_patterns(name: str, patterns: list[str] | None) -> list[re.Pattern]:
    out = []
    for p in patterns or []:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"prune {name}: {p!r} is not a valid regular expression ({exc}); escape special characters such as ( [ *") from None
    return out


@dataclass
class Targets:
    layers: dict[str, torch.nn.Linear] = field(default_factory=dict)
    block_layers: list[list[str]] = field(default_factory=list)     # layer names per block, in order
    block_modules: list[torch.nn.Module] = field(default_factory=list)
    experts: dict[str, tuple[str, torch.nn.Module]] = field(default_factory=dict)  # Linear in an expert -> (expert name, module)
    dense_routers: list[str] = field(default_factory=list)
    last_block_name: str = ""                                       # the model's last block (the probe stops in it)


def _keep(full: str, module, routers, targets, ignore, out: Targets) -> bool:
    named = any(p.search(full) for p in targets)
    if full in routers and not named:  # routers stay dense unless a target pattern names them
        out.dense_routers.append(full)
        return False
    return not (targets and not named) and not any(p.search(full) for p in ignore)


def find_targets(model, targets: list[re.Pattern], ignore: list[re.Pattern], n_m, needs_routing: str | None) -> Targets:
    """The layers to prune, per block.  `needs_routing` (a method name) when the method's statistic needs
    each expert's routed tokens; raises ValueError naming the field to fix."""
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError("prune: found no transformer blocks (a ModuleList of layers with nn.Linear); set targets explicitly")
    out = Targets(last_block_name=blocks[-1][0])
    for prefix, block in blocks:
        routers, experts = moe.find_moe(block, prefix)
        names = []
        for sub, module in block.named_modules():
            full = f"{prefix}.{sub}"
            if not isinstance(module, torch.nn.Linear) or not _keep(full, module, routers, targets, ignore, out):
                continue
            if n_m and module.in_features % n_m[1]:
                raise ValueError(f"prune n_m={n_m[0]}:{n_m[1]}: {full} has {module.in_features} inputs, not divisible by {n_m[1]}")
            out.layers[full] = module
            names.append(full)
            expert = moe.expert_of(full, experts)
            if expert is not None:
                if needs_routing and not hasattr(experts[expert], "routed_tokens"):
                    raise ValueError(f"prune method={needs_routing}: {expert} is an MoE expert whose model does not record its "
                                     "routed tokens (`routed_tokens`, see callbacks/moe.py); use method=magnitude or "
                                     "ignore: ['experts']")
                out.experts[full] = (expert, experts[expert])
        if names:
            out.block_layers.append(names)
            out.block_modules.append(block)
    if not out.layers:
        raise ValueError(
            f"prune targets={[p.pattern for p in targets]} ignore={[p.pattern for p in ignore]} match no "
            "Linear layer inside the transformer blocks; fix the patterns (regexes on module names)"
        )
    return out


def count_expert_tokens(sums, experts: dict, names: list[str], expert_tokens: dict[str, int], samples: int) -> None:
    """Record in `expert_tokens` the calibration tokens routed to each expert among `names` (from any one of
    its Linear layers; all of them see the same rows); stop on an expert that saw none.  Collective: run on
    every rank."""
    zero = torch.zeros(1, dtype=torch.float64)
    for name in names:
        if name in experts:
            total = sums.total(f"{name}#tokens", like=zero)
            expert_tokens[experts[name][0]] = 0 if total is None else int(total.item())
    for expert in dict.fromkeys(experts[n][0] for n in names if n in experts):
        if expert_tokens[expert] == 0:
            parent = expert.rsplit(".", 1)[0]  # the experts list
            routed = sum(v for k, v in expert_tokens.items() if k.rsplit(".", 1)[0] == parent)
            raise ValueError(
                f"prune: MoE expert {expert} saw no calibration tokens (its router sent it none of the {routed} "
                f"routed tokens of {samples} samples); calibrate on more samples (data.nsamples >= {3 * max(samples, 1)}, "
                f"more if its router rarely picks it) or leave it dense with prune.ignore: ['{expert}\\.']")


class FiniteChecks:
    """Whether each statistic one batch added was finite, read at the batch's end with one host synchronisation
    (`verify`) rather than one per layer and sample; the error names the first non-finite one, in the order added."""

    def __init__(self):
        self.flags: list[torch.Tensor] = []
        self.where: list[tuple] = []

    def note(self, finite, name: str, sample_id: int, t: float) -> None:
        if not isinstance(finite, torch.Tensor):  # a plain bool: known already
            if not finite:
                raise _nonfinite_input(name, sample_id, t)
            return
        self.flags.append(finite)
        self.where.append((name, sample_id, t))

    def verify(self) -> None:
        flags, where, self.flags, self.where = self.flags, self.where, [], []
        if flags and not bool(torch.stack(flags).all()):
            raise _nonfinite_input(*where[torch.stack(flags).tolist().index(False)])


def _nonfinite_input(name: str, sample_id: int, t: float) -> FloatingPointError:
    return FloatingPointError(f"NaN/Inf in the input activations of {name} (sample {sample_id}, t={t}); "
                              "check the model's dtype (fp16 overflow?) and the calibration data")


def accumulate(pruner, sums, name: str, x: torch.Tensor, routed, nb, fresh: list[bool] | None = None,
               checks: FiniteChecks | None = None) -> None:
    """Add each fresh sample's statistic to its slot.  Dense layers: x is [B·L, d]; experts: x is
    [n_routed, d], row r being token routed[r] of the flat [B, L] batch (and each sample also adds its
    number of real routed tokens under "<name>#tokens").  `checks`: whether each is finite is noted there (the caller
    verifies them together), else checked at once."""
    fresh = [sid >= 0 for sid in nb.sample_ids] if fresh is None else fresh  # default: every real sample
    n_samples = len(nb.sample_ids)
    weights = pruner.weighting(nb.sink_scores, nb.attention_mask)  # [B, L] or None
    if routed is None:
        x = x.reshape(n_samples, -1, x.shape[-1])
        values = pruner.batch_values(x, weights)
        rows = ((b, x[b], None) for b in range(n_samples))
    else:
        values, rows = None, moe.routed_rows(x, routed, n_samples, nb.input_ids.shape[1])
    for b, xb, pos in rows:  # xb [T_b, d]; pos [T_b] positions of an expert's rows, None for dense layers
        sample_id = nb.sample_ids[b]
        if not fresh[b] or len(xb) == 0:
            continue
        wb = None if weights is None else (weights[b] if pos is None else weights[b, pos])  # [T_b]
        finite = pruner.add(sums, name, sample_id, xb, wb, None if values is None or pos is not None else values[b])
        if pos is not None:
            real = (torch.tensor([len(pos)], dtype=torch.float64, device=x.device) if nb.attention_mask is None  # (no sync)
                    else (nb.attention_mask[b, pos] > 0).sum(dtype=torch.float64).reshape(1))
            sums.add(f"{name}#tokens", sample_id, real)
        if checks is not None:
            checks.note(finite, name, sample_id, nb.t)
        elif not finite:
            raise _nonfinite_input(name, sample_id, nb.t)


def load_masks(masks_from: str, layers: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    """Apply a previous run's masks.safetensors to `layers`, in place; returns the masks."""
    from safetensors.torch import load_file

    from pipeline.maths import sparsity as sp

    saved = load_file(str(Path(masks_from).expanduser() / "masks.safetensors"))
    missing = sorted(set(layers) - set(saved))
    if missing:
        raise ValueError(f"prune masks_from={masks_from}: no mask for {missing[0]} (+{len(missing) - 1} more); was it saved from this model?")
    masks = {}
    with torch.no_grad():
        for name, layer in layers.items():
            masks[name] = saved[name].to(torch.bool)
            sp.apply_mask_(layer.weight, masks[name].to(layer.weight.device))
    return masks


def solve_layer(pruner, name: str, weight: torch.Tensor, stat, target: float | None) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Solve and apply one layer's mask in place (`target`: its fraction, None for N:M): (bool mask on CPU, updated
    weight or None, solver info)."""
    if not torch.isfinite(weight).all():
        raise FloatingPointError(f"NaN/Inf in the weight of {name} before pruning")
    if pruner.statistic and stat is None:
        raise RuntimeError(f"prune: no calibration statistics reached {name}; the layer never ran in the calibration forward")
    result = pruner.solve(weight, stat, target)
    new_weight, info = None, {}
    if result.weight is not None:
        weight.copy_(result.weight)
        new_weight = result.weight  # the caller keeps no copy: the layer holds it
        if result.info.get("retries"):
            rank_zero_warn(f"{name}: Cholesky failed, retried with damping {result.info.get('percdamp')}")
        info = {k: v for k, v in result.info.items() if isinstance(v, (int, float, str))}
    sp.apply_mask_(weight, result.mask.to(weight.device))
    return result.mask.to(torch.bool).cpu(), new_weight, info


def solve_layers(pruner, sums, shared, layers: dict, names: list[str], targets: dict[str, float | None]):
    """solve_layer for each of `names` in order, yielding (name, mask, new weight or None, info); the statistics are
    taken from `sums` (collective), a shared-input group's total once, freed after its last member."""
    shared.release()
    stats = sums.take_each(names, shared.key) if pruner.statistic else ((n, None) for n in names)
    for name, stat in stats:
        yield (name, *solve_layer(pruner, name, layers[name].weight, stat, targets[name]))


def owl_targets(pruner, sums, shared, layers: dict, block_layers: list[list[str]], owl) -> dict[str, float]:
    """Per-layer targets of the OWL profile (pipeline/maths/allocation.py) from the summed statistics, block by block
    (collective: every rank reads the same totals in the same order; the sums are left in place for the solve)."""
    ratios, sizes, blocks = [], [], [names for names in block_layers if names]
    for names in blocks:
        scores = []
        for name in names:
            stat = sums.total(shared.key(name))
            weight = layers[name].weight.detach()
            scores.append(torch.zeros_like(weight, dtype=torch.float32) if stat is None  # an expert no token reached
                          else pruner.outlier_scores(weight, stat).float())
        ratios.append(allocation.outlier_ratio(scores, owl.m))
        sizes.append(sum(layers[n].weight.numel() for n in names))
    per_block = allocation.owl_targets(ratios, sizes, owl.average, owl.lmbda)
    return {name: target for names, target in zip(blocks, per_block) for name in names}


def reapply(layers: dict, masks: dict, pruned_weights: dict) -> None:
    """After resuming from a checkpoint: layers pruned before the interruption get their state back."""
    with torch.no_grad():
        for name, mask in masks.items():
            weight = layers[name].weight
            if name in pruned_weights:
                weight.copy_(pruned_weights[name].to(weight.device, weight.dtype))
            sp.apply_mask_(weight, mask.to(weight.device))


def routed_tokens(experts: dict, name: str) -> torch.Tensor | None:
    """For a Linear inside an MoE expert, called from its hook: the flat [B·L] token index of each input row."""
    expert = experts.get(name)
    return None if expert is None else moe.checked_tokens(expert[1], name)
