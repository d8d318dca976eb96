"""PruneCallback: calibration statistics → masks → applied in place (pruners: pipeline/maths/pruners.py).

Per-sample statistics of the targeted Linear inputs (callbacks/layers.py) go to DDP-exact reduction slots
(callbacks/reduction.py); at the epoch's end every rank solves every layer's mask identically. Scoring,
reports and saving belong to EvaluateExportCallback (callbacks/evaluate.py)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from callbacks.reduction import SlotSums, check_slots, forced_totals
from callbacks.cached import RecordedBatches, calibrate_from_cache, solve_block_by_block, uniform_block_calls
from callbacks.schedule import MeanSinkScores, ProbedInputs, guard_memory, hooked_forward
from callbacks.sink_stats import SinkStatsCallback
from callbacks.layers import Targets, accumulate, compile_patterns, count_expert_tokens, find_targets, load_masks, reapply
from callbacks.layers import FiniteChecks, owl_targets, routed_tokens, solve_layers
from callbacks.shared import SharedInputs
from pipeline.maths import sparsity as sp
from pipeline.maths.allocation import ByGlob, Owl, Uniform, parse_sparsity
from pipeline.model.calibration import NoisedBatch
from pipeline.run.outcome import PruneOutcome
from pipeline.run.phase import phase
from pipeline.run.protocols import (ChecksContracts, ChoosesFlavor, DescribesCalibration, KnowsBlockCalls, NoisedBatchHooks,
                                    OrdersBySlot, PublishesPruneOutcome, SinkScoreConsumer, SizesCalibrationMemory,
                                    check_listed_after, check_module, module_offloader, outcome_publisher)
from pipeline.maths.flavors import get_flavor, make_pruner
from pipeline.maths.pruners import METHODS, check_prune_args


class PruneCallback(Callback, NoisedBatchHooks, SinkScoreConsumer, DescribesCalibration, PublishesPruneOutcome, ChoosesFlavor,
                    ChecksContracts, SizesCalibrationMemory, KnowsBlockCalls):
    """Compute and apply pruning masks from calibration; publish them as a PruneOutcome when calibration ends.

    Args:
        method: magnitude, wanda, sparsegpt, sink_wanda, sink_sparsegpt, or dense (prunes nothing; e.g. to quantize alone).
        sparsity: fraction of each row's weights to prune, in [0, 1) (default 0.5 unless n_m is set); or per layer:
            a mapping of globs on full layer names to fractions (first match wins), or a profile: "owl" or
            {profile: owl, average: 0.5, lmbda: 0.08, m: 5} (pipeline/maths/allocation.py; one-shot, calibrated methods).
        n_m: semi-structured pattern "N:M" (N zeros in every M consecutive inputs), e.g. "2:4".
        targets / ignore: regexes on module names that select / drop Linear layers inside the blocks.
        mode: "oneshot" or "sequential" (block by block, on the outputs of the pruned blocks before it).
        blocksize / percdamp: SparseGPT's column block and Hessian damping (fraction of the mean diagonal).
        reduction_slots: slots for DDP-exact sums (window i → slot i mod it); default 8, 1 for flavor reference-exact.
        masks_from: a previous run's output folder: apply its masks.safetensors instead of calibrating.
        single_pass: read the Linear inputs of SinkStatsCallback's probed forward, no second forward (bit-identical).
        use_variant: the reference's Wanda variant (alpha bisected per row); wanda, flavor=reference only.
        eager: hooked forwards in torch.compile's "force_eager" stance (no cold compile of a compiled SDPA).
        flavor: "default" (this project's), "reference" (the paper's pruners and schedule) or "reference-exact" (also
            its noise order and mass operations: its bits; docs/reference.md); pipeline/maths/flavors.py.
    """

    def __init__(self, method: str = "sink_wanda", sparsity: float | str | dict | None = None, n_m: str | None = None,
                 targets: list[str] | None = None, ignore: list[str] | None = None, mode: str = "oneshot",
                 blocksize: int = 128, percdamp: float = 0.01, reduction_slots: int | None = None, masks_from: str | None = None,
                 single_pass: bool = True, flavor: str = "default", eager: bool = True, use_variant: bool = False):
        self.n_m = sp.parse_n_m(n_m) if method in METHODS else None
        if method in METHODS and sparsity is None and self.n_m is None:
            sparsity = 0.0 if method == "dense" else 0.5
        check_prune_args(method, sparsity, n_m, self.n_m, mode, blocksize, percdamp, reduction_slots)
        self.method, self.flavor = method, get_flavor(flavor)  # the run's flavour: the module and SinkStats read it too
        self.allocation = Uniform(self.n_m[0] / self.n_m[1]) if self.n_m else parse_sparsity(sparsity)
        self.sparsity = self.allocation.average  # the requested average (by globs: known with the layers, on_fit_start)
        self.pruner = make_pruner(method, self.sparsity, self.n_m, self.flavor, blocksize=blocksize, percdamp=percdamp,
                                  use_variant=use_variant)
        self.mode = self.pruner.mode or mode
        if isinstance(self.allocation, Owl) and (not self.pruner.statistic or self.mode != "oneshot" or masks_from):
            raise ValueError(f"prune sparsity: the owl profile ranks every block's calibration statistics at once, so it "
                             f"needs a calibrated method (not magnitude), mode oneshot and no masks_from (got method={method}, "
                             f"mode={self.mode}{', masks_from' if masks_from else ''})")
        self.layer_targets: dict[str, float] = {}  # layer -> fraction to prune (the owl profile's: at the solve)
        self.offset = 1 if self.pruner.mean_scores and self.pruner.statistic else 0  # 1: the epoch also collects s̄
        self.cached = bool(self.pruner.statistic and not masks_from and (self.pruner.inputs == "clean" or self.offset))
        self.mean_scores, self.recorded = MeanSinkScores(self.pruner), RecordedBatches()
        self.targets, self.ignore = compile_patterns("targets", targets), compile_patterns("ignore", ignore)
        if masks_from and not (Path(masks_from).expanduser() / "masks.safetensors").is_file():
            raise FileNotFoundError(f"prune masks_from={masks_from}: no masks.safetensors there; point it at a previous run's output_dir")
        self.reduction_slots, self.masks_from, self.single_pass, self.eager = reduction_slots, masks_from, single_pass, eager
        self.t, self.sums, self.info, self.masks = Targets(), None, {"timings": {}}, {}  # masks: True = pruned
        self.slot_major = False  # windows arrive slot by slot (_order_by_slot)
        self.shared, self.probed = SharedInputs(), ProbedInputs()
        self.seen: set[tuple[int, int, int]] = set()  # (epoch, sample id, timestep index) already counted
        # layers SparseGPT updated; weights to restore on resume; expert name -> calibration tokens routed to it
        self.updated, self._resumed, self.expert_tokens = set(), {}, {}
        self._outcome: PruneOutcome | None = None
        self.rescored = False  # offloaded, sequential, sink scores of the partly pruned model (see _check_offload)
        self.uniform: bool | None = None  # cached: every block called with block 0's arguments (on_fit_start)

    layers = property(lambda self: self.t.layers)  # name -> targeted nn.Linear
    pruned_weights = property(lambda self: {n: self.layers[n].weight.detach().cpu() for n in sorted(self.updated)})
    _routed = lambda self, name: routed_tokens(self.t.experts, name)  # noqa: E731 - an MoE expert's token rows

    @property
    def prune_outcome(self) -> PruneOutcome | None:
        return self._outcome

    @override
    def weights_by_sink_scores(self) -> bool:  # a sink_* method
        return self.pruner.weighting.sink_aware

    @override
    def calibration_memory(self) -> tuple[str | None, int | None]:
        return self.pruner.statistic, self.reduction_slots

    @override
    def blocks_called_alike(self) -> bool | None:
        return self.uniform

    @override
    def check_contracts(self, trainer, pl_module) -> None:
        check_module(pl_module, "PruneCallback")
        check_slots(self.flavor.slots(self.reduction_slots, trainer.world_size), trainer.world_size, "prune reduction_slots")
        outcome_publisher(trainer)  # one pruning callback
        if self.pruner.weighting.sink_aware and not any(isinstance(cb, SinkStatsCallback) for cb in trainer.callbacks):
            raise ValueError(f"prune method={self.method} needs a SinkStatsCallback listed before PruneCallback in trainer.callbacks")
        check_listed_after(trainer, self, SinkStatsCallback, "reads its sink scores")

    @override
    def setup(self, trainer, pl_module, stage=None) -> None:
        self.check_contracts(trainer, pl_module)
        self.reduction_slots = self.flavor.slots(self.reduction_slots, trainer.world_size)

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        """Find the layers once the model exists (configure_model), before any calibration work."""
        self.t = self.find_layers(pl_module.model)
        if not isinstance(self.allocation, Owl):
            self.layer_targets = self.allocation.targets(self.layers)
        if isinstance(self.allocation, ByGlob):
            sizes = {n: layer.weight.numel() for n, layer in self.layers.items()}
            self.sparsity = sum(self.layer_targets[n] * sizes[n] for n in sizes) / sum(sizes.values())
        self._check_offload(pl_module)
        if self.pruner.statistic and not self.masks_from:  # layers fed one tensor share one statistic
            self.shared = SharedInputs.find(pl_module, self.layers, self.t.block_modules[-1], self.eager)
        if self.cached:  # one epoch (s̄, the recorded batches), then block by block from cached inputs at its end
            self.uniform = uniform_block_calls(pl_module, self.eager)  # every block called with block 0's arguments
            trainer.fit_loop.max_epochs = len(self.t.block_layers) if self.rescored else 1
        elif self.mode == "sequential" and self.pruner.statistic and not self.masks_from:
            trainer.fit_loop.max_epochs = len(self.t.block_layers)
        self.sums = self.sums or SlotSums(self.reduction_slots or 8, None if self.mode == "oneshot" else False)  # (resumed: the checkpoint's)
        if (forced := forced_totals()) is not None:  # SINKPRUNE_SLOT_TOTALS, in any mode
            self.sums.host_totals, self.sums.fold_thread = forced
        elif module_offloader(pl_module) is not None:
            self.sums.host_totals = True  # offloaded (any mode, any world size): the plan keeps the totals in CPU memory
        self.slot_major = self._order_by_slot(trainer, pl_module)
        reapply(self.layers, self.masks, self._resumed)  # resumed: restore the layers pruned before
        self.updated, self._resumed = self.updated | set(self._resumed), {}  # (the layers hold them now)

    def find_layers(self, model) -> Targets:
        """The targeted layers of `model` per block; a one-line error when targets/ignore or n_m do not fit it (preflight
        runs it on the model's skeleton, before the run folder exists)."""
        return find_targets(model, self.targets, self.ignore, self.n_m, self.pruner.statistic and self.method)

    def _check_offload(self, pl_module) -> None:
        """An offloaded model calibrates block by block from cached inputs (callbacks/cached.py), every method."""
        if module_offloader(pl_module) is None or not self.pruner.statistic or self.masks_from:
            return
        # sequential with the sink scores of the partly pruned model: one epoch per block, each ending in a mass pass
        # over every block and a pass through the pruned blocks up to this one (about 1.5·L² block onloads in all)
        self.rescored = self.mode == "sequential" and self.pruner.weighting.sink_aware and self.pruner.inputs == "noised"
        self.cached = True

    def _order_by_slot(self, trainer, pl_module) -> bool:
        """One process, Hessians from every batch: ask for the windows slot by slot, so each completed slot is folded
        into its total (one slot alive per layer instead of G; the same sums in the same order, the same bits)."""
        wanted = (self.pruner.statistic == "hessian" and trainer is not None and trainer.world_size == 1 and self.sums.slots > 1
                  and not (self.cached or self.masks_from) and self.flavor.noise_order != "reference")
        data = trainer.datamodule if trainer is not None else None  # (reference noise: the order draws it)
        # (an MoE expert's GEMM takes the tokens routed to it from the whole batch: keep each batch's windows)
        return bool(wanted and isinstance(data, OrdersBySlot) and data.order_by_slot(self.sums.slots, regroup=not self.t.experts))

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self.info["timings"]["calibration_start"] = time.time()
        self.masks = load_masks(self.masks_from, self.layers) if self.masks_from else self.masks

    def _active_layers(self, epoch: int) -> list[str]:
        if self.masks_from or not self.pruner.statistic or self.cached:
            return []
        if self.mode == "sequential":
            return self.t.block_layers[epoch] if epoch < len(self.t.block_layers) else []
        return list(self.layers)

    @override
    def wants_sink_scores(self, epoch: int) -> bool:  # SinkStatsCallback skips its probe when no consumer wants them
        return epoch == 0 or self.pruner.inputs == "noised"

    @override
    def reads_probed_forward(self, epoch: int) -> bool:  # False: the probe may stop at the last attention call
        return self.probed.reads_last_block

    @override
    def calibration_phase(self, epoch: int, epochs: int) -> str | None:
        """Layer-sequential: "calibration block i/L" (after the reference flavour's sink-score epoch, if any)."""
        if self.mode != "sequential" or epochs <= 1:
            return None
        block, blocks = epoch - self.offset, epochs - self.offset
        return "calibration (sink scores)" if block < 0 else f"calibration block {block + 1}/{blocks}"

    @override
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.probed.stop()
        if self.single_pass and self.pruner.weighting.sink_aware and self.pruner.inputs == "noised":
            self.probed.start(self.layers, self._active_layers(trainer.current_epoch), self._routed, self.t.last_block_name)

    @override
    def on_noised_batch(self, trainer, pl_module, nb: NoisedBatch) -> None:
        if self.cached:  # the work happens at the epoch's end (calibrate_from_cache)
            self.recorded.record(nb, self.pruner.inputs == "clean")
            if module_offloader(pl_module) is not None:  # no forward has run: the scores come at the epoch's end
                epoch = trainer.current_epoch
                self.seen.update((epoch, sid, nb.step) for sid in nb.sample_ids if sid >= 0 and not self.offset)
            elif self.offset:
                self.mean_scores.add(nb, self.seen, self.method)
            return
        if not (names := self._active_layers(trainer.current_epoch)):
            return
        if self.pruner.weighting.sink_aware and nb.sink_scores is None:
            raise RuntimeError(f"prune method={self.method}: no sink scores on the batch; list SinkStatsCallback before PruneCallback")
        epoch = trainer.current_epoch
        fresh = [sid >= 0 and (epoch, sid, nb.step) not in self.seen for sid in nb.sample_ids]  # -1: DDP padding
        if self.slot_major and any(fresh):  # the slots before this batch's are complete
            self.sums.fold(list(self.sums.sums), min(self.sums.slot_of(s) for s, f in zip(nb.sample_ids, fresh) if f))
        checks = FiniteChecks()  # (the batch's statistics checked with one host synchronisation)
        if any(fresh) and self.probed.handles:
            for name, x, routed in self.probed.take(names):
                self._add(name, x, routed, nb, fresh, checks)
        elif any(fresh):  # else: a resumed run replaying a batch that the checkpoint already counted
            self._forward_and_accumulate(trainer, pl_module, nb, names, fresh, checks)
        checks.verify()
        self.seen.update((epoch, sid, nb.step) for sid in nb.sample_ids if sid >= 0)

    def _add(self, name, x, routed, nb, fresh=None, checks=None) -> None:
        if not self.shared.is_copy(name, x):  # a member of a shared-input group reads its leader's sums
            accumulate(self.pruner, self.sums, name, x, routed, nb, fresh, checks)

    def _forward_and_accumulate(self, trainer, pl_module, nb, names, fresh, checks=None) -> None:
        # sequential: the blocks after the one being calibrated are not needed yet; one-shot: none after the last target
        last = self.t.block_modules[trainer.current_epoch if self.mode == "sequential" else -1]
        add = lambda n, x: self._add(n, x, self._routed(n), nb, fresh, checks)  # noqa: E731
        hooked_forward(pl_module, self.layers, names, add, nb.input_ids, nb.attention_mask, last, self.eager)

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        with guard_memory(pl_module):
            self._end_epoch(trainer, pl_module)

    def _end_epoch(self, trainer, pl_module) -> None:
        self.probed.stop()
        epoch = trainer.current_epoch
        if self.masks_from or (epoch > 0 and not (self.mode == "sequential" and self.pruner.statistic)):
            return
        if self.cached:
            return self._from_cache(trainer, pl_module)
        if not self.pruner.statistic and module_offloader(pl_module) is not None:
            return solve_block_by_block(self.t, self._solve, pl_module.offloader)
        self._solve(self._active_layers(epoch) if self.pruner.statistic else list(self.layers))

    def _from_cache(self, trainer, pl_module) -> None:
        batches = self.recorded.noised_batches(pl_module.device)
        offloader = module_offloader(pl_module)
        if offloader is not None and self.pruner.weighting.sink_aware:  # scores from SinkStatsCallback's block pass
            sink = next(cb for cb in trainer.callbacks if isinstance(cb, SinkStatsCallback))
            if self.offset:
                for (step, sids), scores in sink.offload_scores.items():  # in dispatch order, as the epoch adds them
                    self.mean_scores.add(NoisedBatch(None, None, None, 0.0, step, list(sids), sink_scores=scores), self.seen, self.method)
            else:
                batches = [NoisedBatch(nb.input_ids, nb.clean_ids, nb.masked, nb.t, nb.step, nb.sample_ids, nb.attention_mask,
                                       sink_scores=sink.scores_for(nb).to(pl_module.device)) for nb in batches]
        if self.offset:  # every rank gets every sample's s̄
            self.mean_scores.gather()
            batches = [self.mean_scores.with_mean(nb, self.flavor.name) for nb in batches]
        on_input = lambda n, x, nb: self._add(n, x, self._routed(n), nb)  # noqa: E731
        targets = self.t
        if self.rescored:  # this epoch's block only, on the outputs of the pruned blocks before it
            e = trainer.current_epoch
            targets = Targets(self.t.layers, [self.t.block_layers[e]], [self.t.block_modules[e]], self.t.experts)
        with phase("calibrating block by block"):
            calibrate_from_cache(pl_module, targets, batches, on_input, self._solve, self.eager, self.mode == "sequential",
                                 self.uniform, self.sums, self.shared.key, offloader)
        if self.rescored:  # the next block's epoch records its own batches (noised alike, through the pruned blocks)
            self.recorded = RecordedBatches()

    def _solve(self, names: list[str]) -> None:
        """Solve and apply the masks of `names` from the sums (collective), then empty the sums."""
        t0 = time.time()
        if self.slot_major:  # every slot is complete: fold the last ones too, before any solve needs the memory
            self.sums.fold(list(self.sums.sums), self.sums.slots)
        if self.pruner.statistic:
            samples, leaders = len({s for _, s, _ in self.seen} | self.recorded.ids), [n for n in names if self.shared.key(n) == n]
            count_expert_tokens(self.sums, self.t.experts, leaders, self.expert_tokens, samples)
        if isinstance(self.allocation, Owl) and not self.layer_targets:
            with torch.no_grad(), phase("OWL layer targets"):
                self.layer_targets = owl_targets(self.pruner, self.sums, self.shared, self.layers, self.t.block_layers,
                                                 self.allocation)
        targets = {n: None if self.n_m else self.layer_targets[n] for n in names}
        with torch.no_grad(), phase("computing the masks"):
            for name, mask, new_weight, info in solve_layers(self.pruner, self.sums, self.shared, self.layers, names, targets):
                self.masks[name] = mask
                if new_weight is not None:
                    self.updated.add(name)
                    self.info.setdefault("sparsegpt", {})[name] = info
        self.sums.clear()
        self.info["timings"]["prune_s"] = self.info["timings"].get("prune_s", 0.0) + time.time() - t0

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        self._outcome = self._publish()

    def _publish(self) -> PruneOutcome:
        timings = dict(self.info["timings"])
        timings["calibration_s"] = time.time() - timings.pop("calibration_start", time.time())
        layers = self.layers
        return PruneOutcome(
            method=self.method, flavor=self.flavor.name, solver=type(self.pruner).__name__, mode=self.mode,
            sparsity=self.sparsity, n_m=self.n_m, promise=self.pruner.promise, layers=layers,
            masks={n: self.masks[n] for n in layers if n in self.masks}, targets=self.layer_targets,
            updated=self.updated, solver_info=self.info.get("sparsegpt", {}), calibrated_pairs=tuple(sorted(self.seen)),
            expert_of={n: e for n, (e, _) in self.t.experts.items()}, expert_tokens=self.expert_tokens,
            dense_routers=tuple(self.t.dense_routers), timings=timings,
            settings={"method": self.method, "flavor": self.flavor.name, "sparsity": self.sparsity, "n_m": self.n_m,
                      "mode": self.mode, "reduction_slots": self.reduction_slots, "masks_from": self.masks_from,
                      "single_pass": self.single_pass, "eager": self.eager})

    @override
    def state_dict(self) -> dict:
        return {"masks": self.masks, "sums": self.sums.state_dict() if self.sums else None,
                "seen": sorted(self.seen), "pruned_weights": self.pruned_weights, "expert_tokens": self.expert_tokens,
                "mean_scores": self.mean_scores.sums, "recorded": self.recorded.state_dict(), "layer_targets": self.layer_targets}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.masks, self._resumed, self.expert_tokens, self.mean_scores.sums = (
            state_dict.get(k, {}) for k in ("masks", "pruned_weights", "expert_tokens", "mean_scores"))
        self.seen = {tuple(k) for k in state_dict.get("seen", [])}
        self.layer_targets = state_dict.get("layer_targets") or self.layer_targets
        self.recorded.load_state_dict(state_dict.get("recorded", {}))
        if state_dict.get("sums") is not None:
            self.sums = SlotSums(self.reduction_slots or state_dict["sums"]["slots"], None if self.mode == "oneshot" else False)
            self.sums.load_state_dict(state_dict["sums"])

