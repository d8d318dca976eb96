"""EvaluateExportCallback: scores the dense model before calibration and the pruned one after, writes
results.json, the masks and the pruned model.

It reads the pruning through the run's PruneOutcome only (pipeline/run/outcome.py), so list it after the callback
that publishes one (PruneCallback).  Without one it only scores the dense model (nothing is written).
"""
from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from typing_extensions import override

from callbacks.quantize import QuantizeCallback, quantize_outcome, quantize_summary
from callbacks.reduction import gather_records
from pipeline.run.outcome import PruneOutcome
from pipeline.run.outputs import prepare_output_dir, run_metadata, save_pruned
from pipeline.run.phase import phase
from pipeline.run.protocols import (ChecksContracts, HeldoutData, PublishesPruneOutcome, ReportsMemory, SavesModel, ScoresHeldout,
                                    check_listed_after, find_outcome, outcome_publisher)
from pipeline.evaluation.report import sparsity_report
from pipeline.evaluation.scoring import paired_results


@rank_zero_only
def _say(*renderables) -> None:
    Console().print(*renderables)


class EvaluateExportCallback(Callback, ChecksContracts, SavesModel):
    """Dense-vs-pruned held-out perplexity and lm-eval tasks; results.json, masks.safetensors and the model.

    Args:
        output_dir: where results.json, masks.safetensors and model/ go (default <default_root_dir>/pruned).
        overwrite: replace an existing output folder written by a previous run.
        save_model: save the pruned model (Hugging Face folder) under output_dir/model.
        score: score the pruned model on the held-out windows.
        score_dense: score the dense model on the held-out windows before calibration.
        tasks: lm-eval task specs ({name, num_fewshot, mc_num, cfg, limit, ...}) for dense and pruned.
        score_dense_tasks: also run `tasks` on the dense model.
        eval_kwargs: keyword arguments for pipeline.evaluation.scoring.evaluate_tasks (batch_size, include_path, ...).
        cache_dense: reuse the dense model's scores from an earlier run with the same weights, held-out windows
            and settings (pipeline/evaluation/dense_cache.py); the printed numbers are the same.
    """

    def __init__(self, output_dir: str | None = None, overwrite: bool = False, save_model: bool = True, score: bool = True,
                 score_dense: bool = True, tasks: list[dict] | None = None, score_dense_tasks: bool = True,
                 eval_kwargs: dict | None = None, cache_dense: bool = True):
        self.output_dir, self.overwrite, self.save_model = output_dir, overwrite, save_model
        self.score, self.score_dense, self.tasks = score, score_dense, tasks or []
        self.score_dense_tasks, self.eval_kwargs = score_dense_tasks, eval_kwargs or {}
        self.cache_dense = cache_dense
        self.dense: dict = {}
        self.dense_windows: dict = {}  # window index -> the dense model's (nll, tokens), every rank's
        self.timings: dict = {}
        self.results: dict | None = None
        self.prunes = False  # a callback publishes a PruneOutcome (found at setup)

    def output_path(self, trainer) -> Path:
        return Path(self.output_dir or Path(trainer.default_root_dir) / "pruned").expanduser()

    @override
    def check_contracts(self, trainer, pl_module) -> None:
        check_listed_after(trainer, self, PublishesPruneOutcome, "reads its PruneOutcome")
        check_listed_after(trainer, self, QuantizeCallback, "scores and saves the weights it quantizes")
        scores = self.score_dense or (self.score and outcome_publisher(trainer) is not None)
        if scores and not isinstance(pl_module, ScoresHeldout):
            raise ValueError(f"evaluate score / score_dense score held-out text with the module's score_heldout, which "
                             f"{type(pl_module).__name__} lacks (ScoresHeldout in pipeline/run/protocols.py); set "
                             "score: false and score_dense: false, or use pipeline.model.module.DLMModule")

    @override
    def setup(self, trainer, pl_module, stage=None) -> None:
        self.prunes = outcome_publisher(trainer) is not None
        self.check_contracts(trainer, pl_module)
        if self.prunes:
            prepare_output_dir(self.output_path(trainer), self.overwrite)

    def _dense_cache_key(self, trainer, pl_module) -> str | None:
        from pipeline.evaluation import dense_cache

        if not (self.cache_dense and dense_cache.enabled()) or trainer.world_size > 1:
            return None
        if not (self.score_dense or (self.tasks and self.score_dense_tasks)):
            return None  # nothing dense to score, so nothing to cache
        if not (isinstance(pl_module, ScoresHeldout) and isinstance(trainer.datamodule, HeldoutData)):
            return None  # the key needs held-out scoring and held-out windows (a plain module has neither)
        settings = {"tasks": self.tasks if self.score_dense_tasks else [], "eval_kwargs": self.eval_kwargs,
                    "heldout": self.score_dense}
        return dense_cache.dense_key(pl_module, settings)

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        from pipeline.evaluation import dense_cache

        key = self._dense_cache_key(trainer, pl_module) if not self.dense else None
        cached = dense_cache.load(key) if key else None
        if cached is not None:
            self.dense = cached["dense"]
            self.dense_windows = cached.get("heldout_windows", {})
            self.timings["dense_cached"] = True
            _say(f"dense scores from the cache ({key[:12]}; SINKPRUNE_NO_DENSE_CACHE=1 rescores)")
        if self.score_dense and "heldout" not in self.dense:
            t0 = time.time()
            with phase("scoring the dense model on held-out text"):
                self.dense["heldout"] = pl_module.score_heldout("dense: held-out text")
            self.dense_windows = gather_records(pl_module.heldout_windows)  # every rank's windows
            self.timings["dense_score_s"] = time.time() - t0
        if "heldout" in self.dense and (cached is not None or "dense_score_s" in self.timings):
            r = self.dense["heldout"]
            _say(f"[bold]dense[/] held-out NLL {r['nll']:.4f} nats/token, perplexity {r['ppl']:.2f} "
                 f"({r['tokens']} tokens)")
        if self.tasks and self.score_dense_tasks and "tasks" not in self.dense:
            t0 = time.time()
            with phase("running lm-eval tasks on the dense model"):
                self.dense["tasks"] = self._evaluate_tasks(pl_module, "dense: ")
            self.timings["dense_tasks_s"] = time.time() - t0
        if key and cached is None:
            dense_cache.store(key, {"dense": self.dense, "heldout_windows": self.dense_windows})

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        if not self.prunes:
            return
        outcome = find_outcome(trainer)
        timings = {**self.timings, **outcome.timings}
        report = sparsity_report(outcome)
        results = {**outcome.summary(), "sparsity_report": report}
        quantized = quantize_outcome(trainer)
        if quantized is not None:  # the layers hold the quantized weights: what is scored and saved
            results["quantize"] = quantize_summary(quantized)
            timings.update(quantized.timings)
        pruned = self._score_pruned(pl_module, timings)
        results.update({"dense": dict(self.dense), "pruned": pruned, "timings": timings, "sparsegpt": dict(outcome.solver_info)})
        results["paired"] = paired_results(self.dense, self.dense_windows, pruned,
                                           gather_records(pl_module.heldout_windows) if self.score else {})
        results["run"] = run_metadata(trainer, pl_module, outcome.settings)
        if isinstance(pl_module, ReportsMemory):  # the plan made before the work, and the measured peaks beside it
            results["memory"] = pl_module.memory_report()
        from pipeline.run.console import ordered_phases, phase_timings

        results["phase_timings"] = ordered_phases(phase_timings(), timings)
        self.results = results
        if trainer.is_global_zero:
            self._print(report, pruned, outcome.method, quantized.scheme.name if quantized is not None else None)
            self._save(trainer, pl_module, results, outcome, quantized)
        if trainer.world_size > 1:
            trainer.strategy.barrier("prune_saved")

    def _save(self, trainer, pl_module, results: dict, outcome: PruneOutcome, quantized=None) -> None:
        out = self.output_path(trainer)
        with phase("saving"):  # results.json gets timings.save_s before the folder is renamed into place
            save_pruned(out, results, outcome.masks, pl_module.model if self.save_model else None,
                        getattr(pl_module, "tokenizer", None), self.overwrite, quantized)
        _say(f"saved pruned model, masks and results to [bold]{out}[/]")
        if quantized is not None:
            self._say_quantized(results, outcome, pl_module, out / "model" if self.save_model else None)
        self._summary(results["phase_timings"])

    def _say_quantized(self, results: dict, outcome: PruneOutcome, pl_module, model_dir) -> None:
        """The scheme, the saved size beside the dense one, and the zeros quantization added (pipeline/evaluation/report.py)."""
        from pipeline.evaluation.report import quantize_line

        mask_zeros = sum(int(m.sum()) for m in outcome.masks.values())
        saved = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) if model_dir is not None else None
        params = {p.data_ptr(): p for p in pl_module.model.parameters()}.values()  # tied weights once
        dense = sum(p.numel() * p.element_size() for p in params)  # quantized in place, still in the model's dtype
        dtype = str(pl_module.model.dtype).removeprefix("torch.")
        Console(highlight=False).print(quantize_line(results["quantize"], results["sparsity_report"], mask_zeros, saved,
                                                     dense, dtype), markup=False)

    def _score_pruned(self, pl_module, timings: dict) -> dict:
        pruned = {}
        if self.score:
            t0 = time.time()
            with phase("scoring the pruned model on held-out text"):
                pruned["heldout"] = pl_module.score_heldout("pruned: held-out text")
            timings["score_s"] = time.time() - t0
        if self.tasks:
            t0 = time.time()
            with phase("running lm-eval tasks on the pruned model"):
                pruned["tasks"] = self._evaluate_tasks(pl_module, "pruned: ")
            timings["tasks_s"] = time.time() - t0
        return pruned

    def _summary(self, phases: dict) -> None:
        """Phase timings, after everything else (also in results.json under `phase_timings`)."""
        from pipeline.run.console import render_timings

        Console().print(render_timings(phases))

    def _print(self, report: dict, pruned: dict, method: str, quantized: str | None = None) -> None:
        from pipeline.evaluation.report import render_scores, render_sparsity

        console = Console()
        console.print(render_sparsity(report))
        if "heldout" in self.dense or "heldout" in pruned:  # no table of dashes when neither was scored
            console.print(render_scores(self.dense, pruned, method, paired=(self.results or {}).get("paired", {}).get("heldout"),
                                        quantized=quantized))
        if self.tasks:
            from pipeline.evaluation.scoring import render_comparison

            console.print(render_comparison(self.dense.get("tasks", {}), pruned.get("tasks", {}),
                                            title=f"benchmarks, dense vs pruned{f' + {quantized}' if quantized else ''} ({method})"))

    def _evaluate_tasks(self, pl_module, label: str = "") -> dict:
        from pipeline.evaluation.scoring import evaluate_tasks

        kwargs = {"show_progress": "rich", "label": label, **self.eval_kwargs}
        return evaluate_tasks(pl_module.model, pl_module.tokenizer, pl_module.mask_token_id, self.tasks, **kwargs)

    @override
    def state_dict(self) -> dict:
        return {"dense": self.dense, "timings": self.timings, "dense_windows": self.dense_windows}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.dense = state_dict.get("dense", {})
        self.timings = state_dict.get("timings", {})
        self.dense_windows = state_dict.get("dense_windows", {})
