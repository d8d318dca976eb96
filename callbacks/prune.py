"""PruneCallback: (sink-aware) Wanda / SparseGPT / magnitude masks, computed from calibration and applied in place.

During calibration it hooks the targeted nn.Linear layers (every Linear inside the transformer blocks by
default: never embeddings or the LM head) and, for every noised batch, adds per input feature
Σ_t (w_t·x_tj)² (Wanda) or the Hessian Σ_t (w_t x_t)(w_t x_t)ᵀ (SparseGPT), where the token weight is
w_t = 1 − sink_score_t for the sink-aware methods and 1 otherwise (0 on padding).  Sums are exact across
DDP world sizes (callbacks/reduction.py); masks are then computed identically on every rank.

Modes: `oneshot` takes every statistic from the dense model in one epoch.  `sequential` runs one epoch
per block: block i is calibrated on the outputs of the already-pruned blocks before it (the forward stops
after block i), so only one block's statistics are alive at a time: less memory, L(L+1)/2 block passes.
`single_pass: true` (one-shot, sink-aware) reads the Linear inputs of SinkStatsCallback's probed forward
instead of running a second forward: the same numbers, bit for bit, for one forward per noised batch.

Mixture-of-experts blocks (callbacks/moe.py): an expert's statistic counts only the tokens routed to it,
each weighted by its own token's weight (read from the expert's `routed_tokens`); routers stay dense
unless `targets` names them.  `results["moe"]` records the calibration tokens each expert saw; an expert
that saw none stops the run (ValueError) instead of being pruned on no data.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from rich.console import Console

from callbacks import moe
from callbacks.protocol import NoisedBatch, find_blocks, forward_through_blocks
from callbacks.reduction import SlotSums
from callbacks.sink_stats import SinkStatsCallback
from pipeline import sparsity as sp
from pipeline.phase import phase
from pipeline.outputs import AtomicDir, prepare_output_dir, run_metadata
from pipeline.report import sparsity_report

METHODS = ("magnitude", "wanda", "sparsegpt", "sink_wanda", "sink_sparsegpt")


def target_linears(model) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear inside the transformer blocks, by full module name (embeddings and LM head excluded)."""
    return {f"{prefix}.{sub}": m for prefix, block in find_blocks(model) for sub, m in block.named_modules()
            if isinstance(m, torch.nn.Linear)}


def _compile(field: str, patterns: list[str] | None) -> list[re.Pattern]:
    out = []
    for p in patterns or []:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"prune {field}: {p!r} is not a valid regular expression ({exc}); escape special characters such as ( [ *") from None
    return out


class PruneCallback(Callback):
    def __init__(
        self,
        method: str = "sink_wanda",
        sparsity: float | None = None,
        n_m: str | None = None,
        targets: list[str] | None = None,
        ignore: list[str] | None = None,
        mode: str = "oneshot",
        blocksize: int = 128,
        percdamp: float = 0.01,
        reduction_slots: int = 8,
        output_dir: str | None = None,
        overwrite: bool = False,
        save_model: bool = True,
        masks_from: str | None = None,
        score: bool = True,
        tasks: list[dict] | None = None,
        score_dense_tasks: bool = True,
        eval_kwargs: dict | None = None,
        single_pass: bool = False,
    ):
        if method not in METHODS:
            raise ValueError(f"prune method={method!r} is unknown; choose one of {', '.join(METHODS)}")
        self.n_m = sp.parse_n_m(n_m)
        if sparsity is None and self.n_m is None:
            sparsity = 0.5
        if self.n_m is None and not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
            raise ValueError(f"prune sparsity={sparsity!r} must be in [0, 1); e.g. 0.5 for 50%")
        if self.n_m is not None and sparsity is not None and sparsity != self.n_m[0] / self.n_m[1]:
            raise ValueError(
                f"prune sparsity={sparsity} disagrees with n_m={n_m} (= {self.n_m[0] / self.n_m[1]}); "
                "drop sparsity or set it to N/M"
            )
        if mode not in ("oneshot", "sequential"):
            raise ValueError(f"prune mode={mode!r} is unknown; use 'oneshot' or 'sequential'")
        for name, value, low in (("reduction_slots", reduction_slots, 1), ("blocksize", blocksize, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"prune {name}={value!r} must be an integer >= {low} (default {128 if name == 'blocksize' else 8})")
        if not (isinstance(percdamp, (int, float)) and 0.0 <= percdamp < 1.0):
            raise ValueError(f"prune percdamp={percdamp!r} must be in [0, 1): the Hessian damping as a fraction of its mean diagonal (default 0.01)")
        self.method, self.mode = method, mode
        self.sparsity = self.n_m[0] / self.n_m[1] if self.n_m else float(sparsity)
        self.targets, self.ignore = _compile("targets", targets), _compile("ignore", ignore)
        self.blocksize, self.percdamp, self.reduction_slots = blocksize, percdamp, reduction_slots
        self.output_dir, self.overwrite, self.save_model = output_dir, overwrite, save_model
        self.masks_from, self.score, self.tasks = masks_from, score, tasks or []
        self.eval_kwargs = eval_kwargs or {}
        self.score_dense_tasks = score_dense_tasks
        self.single_pass = single_pass
        self.layers: dict[str, torch.nn.Linear] = {}
        self.block_layers: list[list[str]] = []
        self.block_modules: list[torch.nn.Module] = []
        self.masks: dict[str, torch.Tensor] = {}
        self.sums: SlotSums | None = None
        self.info: dict = {"timings": {}}
        self.seen: set[tuple[int, int, int]] = set()  # (epoch, sample id, timestep index) already counted
        self.pruned_weights: dict[str, torch.Tensor] = {}  # SparseGPT-updated weights, for resuming
        self.experts: dict[str, tuple[str, torch.nn.Module]] = {}  # Linear in an MoE expert -> (expert name, module)
        self.expert_tokens: dict[str, int] = {}            # expert name -> calibration tokens routed to it
        self.dense_routers: list[str] = []                 # MoE routers left out of pruning
        self._captured: dict[str, torch.Tensor] = {}
        self._capture_handles: list = []

    @property
    def sink_aware(self) -> bool:
        return self.method.startswith("sink_")

    @property
    def statistic(self) -> str | None:
        return {"wanda": "act_sq_sum", "sparsegpt": "hessian"}.get(self.method.replace("sink_", ""))

    # --- setup: find layers, check the output dir, before any heavy work ----------------------------
    def setup(self, trainer, pl_module, stage=None) -> None:
        self.out = prepare_output_dir(self.output_path(trainer), self.overwrite)
        if self.sink_aware and not any(isinstance(cb, SinkStatsCallback) for cb in trainer.callbacks):
            raise ValueError(f"prune method={self.method} needs a SinkStatsCallback listed before PruneCallback in trainer.callbacks")
        if self.masks_from and not (Path(self.masks_from).expanduser() / "masks.safetensors").is_file():
            raise FileNotFoundError(f"prune masks_from={self.masks_from}: no masks.safetensors there; point it at a previous run's output_dir")

    def output_path(self, trainer) -> Path:
        return Path(self.output_dir or Path(trainer.default_root_dir) / "pruned").expanduser()

    def on_fit_start(self, trainer, pl_module) -> None:
        """Find the layers once the model exists (configure_model), before any calibration work."""
        blocks = find_blocks(pl_module.model)
        if not blocks:
            raise ValueError("prune: found no transformer blocks (a ModuleList of layers with nn.Linear); set targets explicitly")
        self.layers, self.block_layers, self.block_modules, self.experts, self.dense_routers = {}, [], [], {}, []
        for prefix, block in blocks:
            routers, experts = moe.find_moe(block, prefix)
            names = []
            for sub, module in block.named_modules():
                full = f"{prefix}.{sub}"
                if not isinstance(module, torch.nn.Linear):
                    continue
                named = any(p.search(full) for p in self.targets)
                if full in routers and not named:  # routers stay dense unless a target pattern names them
                    self.dense_routers.append(full)
                    continue
                if self.targets and not named:
                    continue
                if any(p.search(full) for p in self.ignore):
                    continue
                if self.n_m and module.in_features % self.n_m[1]:
                    raise ValueError(f"prune n_m={self.n_m[0]}:{self.n_m[1]}: {full} has {module.in_features} inputs, not divisible by {self.n_m[1]}")
                self.layers[full] = module
                names.append(full)
                expert = moe.expert_of(full, experts)
                if expert is not None:
                    if self.statistic and not hasattr(experts[expert], "routed_tokens"):
                        raise ValueError(f"prune method={self.method}: {expert} is an MoE expert whose model does not record its "
                                         "routed tokens (`routed_tokens`, see callbacks/moe.py); use method=magnitude or "
                                         "ignore: ['experts']")
                    self.experts[full] = (expert, experts[expert])
            if names:
                self.block_layers.append(names)
                self.block_modules.append(block)
        if not self.layers:
            raise ValueError(
                f"prune targets={[p.pattern for p in self.targets]} ignore={[p.pattern for p in self.ignore]} match no "
                "Linear layer inside the transformer blocks; fix the patterns (regexes on module names)"
            )
        if self.mode == "sequential" and self.statistic and not self.masks_from:
            trainer.fit_loop.max_epochs = len(self.block_layers)
        if self.sums is None:
            self.sums = SlotSums(self.reduction_slots)
        self._reapply_restored(pl_module)

    def _reapply_restored(self, pl_module) -> None:
        """After resuming from a checkpoint: layers pruned before the interruption get their state back."""
        with torch.no_grad():
            for name, mask in self.masks.items():
                weight = self.layers[name].weight
                if name in self.pruned_weights:
                    weight.copy_(self.pruned_weights[name].to(weight.device, weight.dtype))
                sp.apply_mask_(weight, mask.to(weight.device))

    def on_train_start(self, trainer, pl_module) -> None:
        if self.tasks and self.score_dense_tasks and hasattr(pl_module, "results"):
            dense = pl_module.results.setdefault("dense", {})
            if "tasks" not in dense:
                t0 = time.time()
                with phase("running lm-eval tasks on the dense model"):
                    dense["tasks"] = self._evaluate_tasks(pl_module)
                self.info["timings"]["dense_tasks_s"] = time.time() - t0
        self.info["timings"]["calibration_start"] = time.time()
        if self.masks_from:
            self._apply_saved_masks(pl_module)

    # --- calibration --------------------------------------------------------------------------------
    def _active_layers(self, epoch: int) -> list[str]:
        if self.masks_from or not self.statistic:
            return []
        if self.mode == "sequential":
            return self.block_layers[epoch] if epoch < len(self.block_layers) else []
        return list(self.layers)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.single_pass and self.sink_aware and self.mode == "oneshot":
            # Capture the inputs of SinkStatsCallback's probed forward instead of running a second one:
            # that forward is bit-identical to a plain one (the probe changes no output).
            self._captured = {}
            self._capture_handles = [
                self.layers[n].register_forward_hook(
                    lambda mod, inp, out, n=n: self._captured.__setitem__(n, (inp[0].detach(), self._routed(n))))
                for n in self._active_layers(trainer.current_epoch)
            ]

    def on_noised_batch(self, trainer, pl_module, nb: NoisedBatch) -> None:
        names = self._active_layers(trainer.current_epoch)
        if not names:
            return
        if self.sink_aware and nb.sink_scores is None:
            raise RuntimeError(f"prune method={self.method}: no sink scores on the batch; list SinkStatsCallback before PruneCallback")
        epoch = trainer.current_epoch
        fresh = [sid >= 0 and (epoch, sid, nb.step) not in self.seen for sid in nb.sample_ids]  # -1: DDP padding
        if any(fresh) and self._capture_handles:
            captured, self._captured = self._captured, {}
            for name in names:
                if name in captured:  # an expert that no token was routed to did not run
                    self._accumulate(name, *captured[name], nb, fresh)
        elif any(fresh):  # else: a resumed run replaying a batch that the checkpoint already counted
            self._forward_and_accumulate(trainer, pl_module, nb, names, fresh)
        self.seen.update((epoch, sid, nb.step) for sid in nb.sample_ids if sid >= 0)

    def _forward_and_accumulate(self, trainer, pl_module, nb, names, fresh) -> None:
        handles = [self.layers[n].register_forward_hook(
            lambda mod, inp, out, n=n: self._accumulate(n, inp[0].detach(), self._routed(n), nb, fresh)) for n in names]
        # sequential: blocks after the one being calibrated are not needed yet; one-shot: nothing after the last target
        last = self.block_modules[trainer.current_epoch] if self.mode == "sequential" else self.block_modules[-1]
        try:
            forward_through_blocks(pl_module, nb.input_ids, nb.attention_mask, stop_after=last)
        finally:
            for h in handles:
                h.remove()

    def _row_weights(self, nb: NoisedBatch) -> torch.Tensor | None:
        weights = None
        if self.sink_aware:
            weights = 1.0 - nb.sink_scores.float()
        if nb.attention_mask is not None:
            pad = nb.attention_mask.float()
            weights = pad if weights is None else weights * pad
        return weights

    def _routed(self, name: str) -> torch.Tensor | None:
        """For a Linear inside an MoE expert, called from its hook: the flat [B·L] token index of each input row."""
        expert = self.experts.get(name)
        return None if expert is None else moe.checked_tokens(expert[1], name)

    def _accumulate(self, name: str, x: torch.Tensor, routed: torch.Tensor | None, nb: NoisedBatch, fresh: list[bool]) -> None:
        """Add each fresh sample's Σ_t (w_t x_t)² (or Hessian) to its reduction slot.

        Dense layers: x is [B·L, d] (any leading shape).  Experts: x is [n_routed, d], row r being token
        routed[r] of the flattened [B, L] batch; each sample adds only its own routed rows with their own
        weights, and their number (padding excluded) under the key "<name>#tokens"."""
        n_samples = len(nb.sample_ids)
        weights = self._row_weights(nb)  # [B, L] or None
        if routed is None:
            x = x.reshape(n_samples, -1, x.shape[-1])
            act_sq_sums = sp.sample_act_sq_sums(x, weights) if self.statistic != "hessian" else None
            rows = ((b, x[b], None) for b in range(n_samples))
        else:
            rows = moe.routed_rows(x, routed, n_samples, nb.input_ids.shape[1])
        for b, xb, pos in rows:  # xb [T_b, d]; pos [T_b] positions of an expert's rows, None for dense layers
            sample_id = nb.sample_ids[b]
            if not fresh[b] or len(xb) == 0:
                continue
            wb = None if weights is None else (weights[b] if pos is None else weights[b, pos])  # [T_b]
            if self.statistic == "hessian":
                acc = self.sums.accumulator(name, sample_id, (x.shape[-1], x.shape[-1]), device=x.device)
                sp.add_sample_hessian_(acc, xb, wb)
                # NaN/Inf anywhere in x reaches the diagonal (H_jj = Σ x_j²), so checking it is enough.
                finite = torch.isfinite(acc.diagonal()).all()
            else:
                value = act_sq_sums[b] if pos is None else sp.sample_act_sq_sums(xb[None], None if wb is None else wb[None])[0]
                finite = torch.isfinite(value).all()
                self.sums.add(name, sample_id, value)
            if pos is not None:
                real = len(pos) if nb.attention_mask is None else int((nb.attention_mask[b, pos] > 0).sum())
                self.sums.add(f"{name}#tokens", sample_id, torch.tensor([real], dtype=torch.float64, device=x.device))
            if not finite:
                raise FloatingPointError(f"NaN/Inf in the input activations of {name} (sample {sample_id}, t={nb.t}); "
                                         "check the model's dtype (fp16 overflow?) and the calibration data")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        for h in self._capture_handles:
            h.remove()
        self._capture_handles, self._captured = [], {}
        epoch = trainer.current_epoch
        if self.masks_from:
            return
        if self.mode == "sequential" and self.statistic:
            names = self.block_layers[epoch] if epoch < len(self.block_layers) else []
        elif epoch == 0:
            names = list(self.layers)
        else:
            return
        t0 = time.time()
        if self.statistic:
            self._count_expert_tokens(names)
        with torch.no_grad(), phase("computing the masks"):
            for name in names:
                self._prune_layer(name)
        self.sums.clear()
        self.info["timings"]["prune_s"] = self.info["timings"].get("prune_s", 0.0) + time.time() - t0

    def _count_expert_tokens(self, names: list[str]) -> None:
        """Record the calibration tokens routed to each expert among `names` (from any one of its Linear layers;
        all of them see the same rows); stop on an expert that saw none.  Collective: run on every rank."""
        zero = torch.zeros(1, dtype=torch.float64)
        for name in names:
            if name in self.experts:
                total = self.sums.total(f"{name}#tokens", like=zero)
                self.expert_tokens[self.experts[name][0]] = 0 if total is None else int(total.item())
        for expert in dict.fromkeys(self.experts[n][0] for n in names if n in self.experts):
            if self.expert_tokens[expert] == 0:
                samples = len({sid for _, sid, _ in self.seen})
                parent = expert.rsplit(".", 1)[0]  # the experts list
                routed = sum(v for k, v in self.expert_tokens.items() if k.rsplit(".", 1)[0] == parent)
                raise ValueError(
                    f"prune: MoE expert {expert} saw no calibration tokens (its router sent it none of the {routed} "
                    f"routed tokens of {samples} samples); calibrate on more samples (data.nsamples >= {3 * max(samples, 1)}, "
                    f"more if its router rarely picks it) or leave it dense with prune.ignore: ['{expert}\\.']")

    def _prune_layer(self, name: str) -> None:
        layer = self.layers[name]
        weight = layer.weight
        if not torch.isfinite(weight).all():
            raise FloatingPointError(f"NaN/Inf in the weight of {name} before pruning")
        if self.statistic is None:
            mask = sp.select_mask(sp.magnitude_scores(weight.float()), self.sparsity if not self.n_m else None, self.n_m)
        else:
            stat = self.sums.total(name)
            if stat is None:
                raise RuntimeError(f"prune: no calibration statistics reached {name}; the layer never ran in the calibration forward")
            if self.statistic == "act_sq_sum":
                scores = sp.wanda_scores(weight.float(), stat.to(weight.device))
                mask = sp.select_mask(scores, self.sparsity if not self.n_m else None, self.n_m)
            else:
                new_weight, mask, info = sp.sparsegpt_prune(
                    weight, stat.to(weight.device), sparsity=self.sparsity if not self.n_m else None, n_m=self.n_m,
                    blocksize=self.blocksize, percdamp=self.percdamp,
                )
                weight.copy_(new_weight)
                self.pruned_weights[name] = new_weight.detach().cpu()
                if info.get("retries"):
                    Console().print(f"[yellow]{name}: Cholesky failed, retried with damping {info.get('percdamp')}[/]")
                self.info.setdefault("sparsegpt", {})[name] = {k: v for k, v in info.items() if isinstance(v, (int, float, str))}
        sp.apply_mask_(weight, mask.to(weight.device))
        self.masks[name] = mask.to(torch.bool).cpu()

    def _apply_saved_masks(self, pl_module) -> None:
        from safetensors.torch import load_file

        saved = load_file(str(Path(self.masks_from).expanduser() / "masks.safetensors"))
        missing = sorted(set(self.layers) - set(saved))
        if missing:
            raise ValueError(f"prune masks_from={self.masks_from}: no mask for {missing[0]} (+{len(missing) - 1} more); was it saved from this model?")
        with torch.no_grad():
            for name in self.layers:
                mask = saved[name].to(torch.bool)
                sp.apply_mask_(self.layers[name].weight, mask.to(self.layers[name].weight.device))
                self.masks[name] = mask

    # --- after calibration: report, score, save ----------------------------------------------------
    def on_train_end(self, trainer, pl_module) -> None:
        console = Console()
        self.info["timings"]["calibration_s"] = time.time() - self.info["timings"].pop("calibration_start", time.time())
        report = sparsity_report(self.layers, self.masks, self.sparsity, self.n_m)
        results = {"method": self.method, "sparsity": self.sparsity, "n_m": self.n_m, "mode": self.mode,
                   "calibrated_pairs": sorted(self.seen), "sparsity_report": report}
        if self.experts:  # tokens routed to each expert (noised tokens, padding excluded; each token counts top_k times per layer)
            results["moe"] = {"expert_tokens": dict(sorted(self.expert_tokens.items())), "dense_routers": self.dense_routers}
        pruned_scores = {}
        if self.score and hasattr(pl_module, "score_heldout"):
            t0 = time.time()
            with phase("scoring the pruned model on held-out text"):
                pruned_scores["heldout"] = pl_module.score_heldout()
            self.info["timings"]["score_s"] = time.time() - t0
        dense_scores = dict(getattr(pl_module, "results", {}).get("dense", {}))
        if self.tasks:
            t0 = time.time()
            with phase("running lm-eval tasks on the pruned model"):
                pruned_scores["tasks"] = self._evaluate_tasks(pl_module)
            self.info["timings"]["tasks_s"] = time.time() - t0
        if hasattr(pl_module, "results"):
            pl_module.results["pruned"] = pruned_scores
        results.update({"dense": dense_scores, "pruned": pruned_scores, "timings": self.info["timings"], "sparsegpt": self.info.get("sparsegpt", {})})
        results["run"] = run_metadata(trainer, pl_module, self)
        self.results = results
        if trainer.is_global_zero:
            from pipeline.report import render_scores, render_sparsity

            console.print(render_sparsity(report))
            console.print(render_scores(dense_scores, pruned_scores, self.method))
            if self.tasks:
                from pipeline.scoring import render_comparison

                console.print(render_comparison(dense_scores.get("tasks", {}), pruned_scores.get("tasks", {}), title=f"benchmarks, dense vs pruned ({self.method})"))
            with phase("saving"):
                self._save(pl_module, results)
        if trainer.world_size > 1:
            trainer.strategy.barrier("prune_saved")

    def _evaluate_tasks(self, pl_module) -> dict:
        from pipeline.scoring import evaluate_tasks

        return evaluate_tasks(pl_module.model, pl_module.tokenizer, pl_module.mask_token_id, self.tasks, **self.eval_kwargs)

    def _save(self, pl_module, results: dict) -> None:
        from safetensors.torch import save_file

        with AtomicDir(self.out, overwrite=self.overwrite) as tmp:
            save_file({n: m.to(torch.uint8).contiguous() for n, m in self.masks.items()}, str(tmp / "masks.safetensors"))
            if self.save_model:
                from pipeline.outputs import save_model

                save_model(pl_module.model, getattr(pl_module, "tokenizer", None), tmp / "model")
            (tmp / "results.json").write_text(json.dumps(results, indent=1, default=str))
        Console().print(f"saved pruned model, masks and results to [bold]{self.out}[/]")

    # --- checkpointable state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"masks": self.masks, "sums": self.sums.state_dict() if self.sums else None,
                "seen": sorted(self.seen), "pruned_weights": self.pruned_weights, "expert_tokens": self.expert_tokens}

    def load_state_dict(self, state_dict: dict) -> None:
        self.masks = state_dict.get("masks", {})
        self.seen = {tuple(k) for k in state_dict.get("seen", [])}
        self.pruned_weights = state_dict.get("pruned_weights", {})
        self.expert_tokens = state_dict.get("expert_tokens", {})
        if state_dict.get("sums") is not None:
            self.sums = SlotSums(self.reduction_slots)
            self.sums.load_state_dict(state_dict["sums"])
