"""PruneCallback: calibration statistics → masks → applied in place (pruners in pipeline/maths/pruners.py).

It hooks the targeted Linear layers (callbacks/layers.py), adds each sample's statistic to a reduction
slot (exact across DDP world sizes, callbacks/reduction.py) and at the epoch's end solves every layer's
mask, identically on every rank.  Token weights come from the pruner's weighting policy.

`sequential` calibrates block i on the outputs of the already-pruned blocks before it, one epoch per block
(one block's statistics alive at a time).  MoE experts count only the tokens routed to them.  Scoring,
reports and saving are EvaluateExportCallback's (callbacks/evaluate.py).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from callbacks import moe
from callbacks.reduction import SlotSums, gather_records
from callbacks.sink_stats import SinkStatsCallback
from callbacks.layers import Targets, accumulate, compile_patterns, count_expert_tokens, find_targets, load_masks
from pipeline.maths import sparsity as sp
from pipeline.maths.attention import force_eager
from pipeline.model.calibration import NoisedBatch, forward_through_blocks
from pipeline.run.phase import phase
from pipeline.maths.pruners import METHODS, check_prune_args, make_pruner


class PruneCallback(Callback):
    """Compute and apply pruning masks from calibration.

    Args:
        method: magnitude, wanda, sparsegpt, sink_wanda or sink_sparsegpt.
        sparsity: fraction of each row's weights to prune, in [0, 1) (default 0.5 unless n_m is set).
        n_m: semi-structured pattern "N:M" (N zeros in every M consecutive inputs), e.g. "2:4".
        targets / ignore: regexes on module names that select / drop Linear layers inside the blocks.
        mode: "oneshot" or "sequential" (one epoch per block, on the outputs of the pruned blocks before it).
        blocksize / percdamp: SparseGPT's column block and Hessian damping (fraction of the mean diagonal).
        reduction_slots: fixed slots for DDP-exact sums (window i goes to slot i mod reduction_slots).
        masks_from: a previous run's output folder: apply its masks.safetensors instead of calibrating.
        single_pass: reuse SinkStatsCallback's probed forward instead of a second forward (sink-aware methods on
            noised inputs, one-shot or sequential; the same statistics bit for bit); default true, false runs it.
        use_variant: the reference's Wanda variant (per-row cumulative-metric threshold, alpha bisected to the
            sparsity); method=wanda, flavor=reference, unstructured only.
        eager: run the hooked calibration forwards in torch.compile's "force_eager" stance (as the sink probe does):
            a few hundred calibration forwards seldom repay a cold compile (LLaDA's remote code compiles its SDPA
            wrapper); false lets compiled code compile.
        flavor: the pruner variant (pipeline/maths/pruners.py FLAVORS): "default" (this project's) or
            "reference" (what the paper's code computes, its calibration schedule included: `mode` is then the
            reference's: one-shot for sink_wanda, layer-sequential on clean windows for the others).
    """

    def __init__(self, method: str = "sink_wanda", sparsity: float | None = None, n_m: str | None = None,
                 targets: list[str] | None = None, ignore: list[str] | None = None, mode: str = "oneshot",
                 blocksize: int = 128, percdamp: float = 0.01, reduction_slots: int = 8, masks_from: str | None = None,
                 single_pass: bool = True, flavor: str = "default", eager: bool = True, use_variant: bool = False):
        self.n_m = sp.parse_n_m(n_m) if method in METHODS else None
        if method in METHODS and sparsity is None and self.n_m is None:
            sparsity = 0.5
        check_prune_args(method, sparsity, n_m, self.n_m, mode, blocksize, percdamp, reduction_slots)
        self.method, self.flavor = method, flavor
        self.sparsity = self.n_m[0] / self.n_m[1] if self.n_m else float(sparsity)
        self.pruner = make_pruner(method, self.sparsity, self.n_m, flavor, blocksize=blocksize, percdamp=percdamp,
                                  use_variant=use_variant)
        self.mode = self.pruner.mode or mode
        # epochs before the block epochs: 1 when the pruner needs each sample's mean sink scores first
        self.offset = 1 if self.pruner.mean_scores and self.pruner.statistic else 0
        self.mean_scores: dict[int, list] = {}  # sample id -> [Σ_t s_t (float32 [L]), number of timesteps]
        self.targets, self.ignore = compile_patterns("targets", targets), compile_patterns("ignore", ignore)
        self.reduction_slots, self.masks_from, self.single_pass, self.eager = reduction_slots, masks_from, single_pass, eager
        self.t = Targets()
        self.masks: dict[str, torch.Tensor] = {}
        self.sums: SlotSums | None = None
        self.info: dict = {"timings": {}}
        self.seen: set[tuple[int, int, int]] = set()  # (epoch, sample id, timestep index) already counted
        self.pruned_weights: dict[str, torch.Tensor] = {}  # SparseGPT-updated weights, for resuming
        self.expert_tokens: dict[str, int] = {}            # expert name -> calibration tokens routed to it
        self._captured: dict[str, tuple] = {}
        self._capture_handles: list = []

    @property
    def layers(self) -> dict[str, torch.nn.Linear]:
        return self.t.layers

    @override
    def setup(self, trainer, pl_module, stage=None) -> None:
        if self.pruner.weighting.sink_aware and not any(isinstance(cb, SinkStatsCallback) for cb in trainer.callbacks):
            raise ValueError(f"prune method={self.method} needs a SinkStatsCallback listed before PruneCallback in trainer.callbacks")
        if self.masks_from and not (Path(self.masks_from).expanduser() / "masks.safetensors").is_file():
            raise FileNotFoundError(f"prune masks_from={self.masks_from}: no masks.safetensors there; point it at a previous run's output_dir")

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        """Find the layers once the model exists (configure_model), before any calibration work."""
        self.t = find_targets(pl_module.model, self.targets, self.ignore, self.n_m, self.pruner.statistic and self.method)
        if self.mode == "sequential" and self.pruner.statistic and not self.masks_from:
            trainer.fit_loop.max_epochs = len(self.t.block_layers) + self.offset
        if self.sums is None:
            self.sums = SlotSums(self.reduction_slots)
        with torch.no_grad():  # resumed from a checkpoint: layers pruned before the interruption get their state back
            for name, mask in self.masks.items():
                weight = self.layers[name].weight
                if name in self.pruned_weights:
                    weight.copy_(self.pruned_weights[name].to(weight.device, weight.dtype))
                sp.apply_mask_(weight, mask.to(weight.device))

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self.info["timings"]["calibration_start"] = time.time()
        if self.masks_from:
            self.masks = load_masks(self.masks_from, self.layers)

    def _active_layers(self, epoch: int) -> list[str]:
        if self.masks_from or not self.pruner.statistic:
            return []
        if epoch < self.offset:  # the mean-scores epoch
            return []
        if self.mode == "sequential":
            block = epoch - self.offset
            return self.t.block_layers[block] if block < len(self.t.block_layers) else []
        return list(self.layers)

    def wants_sink_scores(self, epoch: int) -> bool:
        """SinkStatsCallback skips its probed forward when no consumer needs the scores (clean-input block epochs
        after the first; the first still records the sink diagnostics)."""
        return epoch == 0 or self.pruner.inputs == "noised"

    @override
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.single_pass and self.pruner.weighting.sink_aware and self.pruner.inputs == "noised":
            # Capture the inputs of SinkStatsCallback's probed forward (bit-identical to a plain one); in sequential
            # mode too: the probed forward runs the same partly pruned model, so block i's inputs are the same bits.
            self._captured = {}
            self._capture_handles = [self.layers[n].register_forward_hook(
                lambda mod, inp, out, n=n: self._captured.__setitem__(n, (inp[0].detach(), self._routed(n))))
                for n in self._active_layers(trainer.current_epoch)]

    def on_noised_batch(self, trainer, pl_module, nb: NoisedBatch) -> None:
        if trainer.current_epoch < self.offset and not self.masks_from:
            self._add_mean_scores(nb)
            return
        names = self._active_layers(trainer.current_epoch)
        if not names:
            return
        if self.pruner.inputs == "clean":
            if nb.step != 0:  # clean inputs: one pass per sample, not one per timestep
                return
            nb = self._clean_batch(nb)
        if self.pruner.weighting.sink_aware and nb.sink_scores is None:
            raise RuntimeError(f"prune method={self.method}: no sink scores on the batch; list SinkStatsCallback before PruneCallback")
        epoch = trainer.current_epoch
        fresh = [sid >= 0 and (epoch, sid, nb.step) not in self.seen for sid in nb.sample_ids]  # -1: DDP padding
        if any(fresh) and self._capture_handles:
            captured, self._captured = self._captured, {}
            for name in names:
                if name in captured:  # an expert that no token was routed to did not run
                    accumulate(self.pruner, self.sums, name, *captured[name], nb, fresh)
        elif any(fresh):  # else: a resumed run replaying a batch that the checkpoint already counted
            self._forward_and_accumulate(trainer, pl_module, nb, names, fresh)
        self.seen.update((epoch, sid, nb.step) for sid in nb.sample_ids if sid >= 0)

    def _add_mean_scores(self, nb: NoisedBatch) -> None:
        """Σ_t s_t per sample, in the timesteps' order (float32, as the reference adds them)."""
        if nb.sink_scores is None:
            raise RuntimeError(f"prune method={self.method}: no sink scores on the batch; list SinkStatsCallback before PruneCallback")
        for b, sid in enumerate(nb.sample_ids):
            if sid < 0 or (0, sid, nb.step) in self.seen:
                continue
            scores = nb.sink_scores[b].detach().float().cpu()
            if sid in self.mean_scores:
                self.mean_scores[sid][0] = self.mean_scores[sid][0] + scores
                self.mean_scores[sid][1] += 1
            else:
                self.mean_scores[sid] = [scores, 1]
            self.seen.add((0, sid, nb.step))

    def _clean_batch(self, nb: NoisedBatch) -> NoisedBatch:
        """The clean text x_0 of the batch, carrying s̄ (each sample's mean sink scores) when the pruner uses them."""
        scores = None
        if self.pruner.mean_scores and self.pruner.weighting.sink_aware:
            missing = [sid for sid in nb.sample_ids if sid >= 0 and sid not in self.mean_scores]
            if missing:
                raise RuntimeError(f"prune flavor={self.flavor}: no mean sink scores for samples {missing[:4]}; "
                                   "the first (scores) epoch must see every calibration sample")
            length = nb.clean_ids.shape[1]
            scores = torch.stack([self.mean_scores[sid][0] / self.mean_scores[sid][1] if sid >= 0 else torch.zeros(length)
                                  for sid in nb.sample_ids]).to(nb.clean_ids.device)
        return NoisedBatch(nb.clean_ids, nb.clean_ids, torch.zeros_like(nb.masked), 0.0, nb.step, nb.sample_ids,
                           nb.attention_mask, sink_scores=scores)

    def _forward_and_accumulate(self, trainer, pl_module, nb, names, fresh) -> None:
        handles = [self.layers[n].register_forward_hook(
            lambda mod, inp, out, n=n: accumulate(self.pruner, self.sums, n, inp[0].detach(), self._routed(n), nb, fresh))
            for n in names]
        # sequential: blocks after the one being calibrated are not needed yet; one-shot: nothing after the last target
        last = self.t.block_modules[trainer.current_epoch - self.offset] if self.mode == "sequential" else self.t.block_modules[-1]
        stance = force_eager() if self.eager else None
        try:
            forward_through_blocks(pl_module, nb.input_ids, nb.attention_mask, stop_after=last)
        finally:
            if stance is not None:
                stance.__exit__(None, None, None)
            for h in handles:
                h.remove()

    def _routed(self, name: str) -> torch.Tensor | None:
        """For a Linear inside an MoE expert, called from its hook: the flat [B·L] token index of each input row."""
        expert = self.t.experts.get(name)
        return None if expert is None else moe.checked_tokens(expert[1], name)

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        for h in self._capture_handles:
            h.remove()
        self._capture_handles, self._captured = [], {}
        epoch = trainer.current_epoch
        if epoch < self.offset and not self.masks_from:  # every rank gets every sample's s̄
            self.mean_scores = {int(k): v for k, v in gather_records(self.mean_scores).items()}
            return
        if self.masks_from or (epoch > self.offset and not (self.mode == "sequential" and self.pruner.statistic)):
            return
        names = self._active_layers(epoch) if self.pruner.statistic else list(self.layers)
        t0 = time.time()
        if self.pruner.statistic:
            count_expert_tokens(self.sums, self.t.experts, names, self.expert_tokens, len({s for _, s, _ in self.seen}))
        with torch.no_grad(), phase("computing the masks"):
            for name in names:
                self._prune_layer(name)
        self.sums.clear()
        self.info["timings"]["prune_s"] = self.info["timings"].get("prune_s", 0.0) + time.time() - t0

    def _prune_layer(self, name: str) -> None:
        weight = self.layers[name].weight
        if not torch.isfinite(weight).all():
            raise FloatingPointError(f"NaN/Inf in the weight of {name} before pruning")
        stat = self.sums.total(name) if self.pruner.statistic else None
        if self.pruner.statistic and stat is None:
            raise RuntimeError(f"prune: no calibration statistics reached {name}; the layer never ran in the calibration forward")
        result = self.pruner.solve(weight, stat)
        if result.weight is not None:
            weight.copy_(result.weight)
            self.pruned_weights[name] = result.weight.detach().cpu()
            if result.info.get("retries"):
                rank_zero_warn(f"{name}: Cholesky failed, retried with damping {result.info.get('percdamp')}")
            self.info.setdefault("sparsegpt", {})[name] = {k: v for k, v in result.info.items() if isinstance(v, (int, float, str))}
        sp.apply_mask_(weight, result.mask.to(weight.device))
        self.masks[name] = result.mask.to(torch.bool).cpu()

    @override
    def state_dict(self) -> dict:
        return {"masks": self.masks, "sums": self.sums.state_dict() if self.sums else None,
                "seen": sorted(self.seen), "pruned_weights": self.pruned_weights, "expert_tokens": self.expert_tokens,
                "mean_scores": self.mean_scores}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.masks = state_dict.get("masks", {})
        self.seen = {tuple(k) for k in state_dict.get("seen", [])}
        self.pruned_weights = state_dict.get("pruned_weights", {})
        self.expert_tokens = state_dict.get("expert_tokens", {})
        self.mean_scores = state_dict.get("mean_scores", {})
        if state_dict.get("sums") is not None:
            self.sums = SlotSums(self.reduction_slots)
            self.sums.load_state_dict(state_dict["sums"])

