"""Benchmark scores of an in-memory diffusion LM through lm-eval, and dense-vs-pruned reporting.

    specs = [normalize_spec(t) for t in ("wiki_cloze_offline", {"name": "mmlu_dev_offline", "mc_num": 1})]
    dense = evaluate_tasks(model, tokenizer, mask_id, specs, limit=200)
    pruned = evaluate_tasks(pruned_model, tokenizer, mask_id, specs, limit=200)
    rich.print(render_comparison(dense, pruned))

A task is a name or a dict {name, num_fewshot, limit, mc_num, cfg, batch_size, gen_kwargs} (the sampler
settings gen_length, block_length, steps, temperature, remasking may also sit at the top level, e.g.
{name: gsm8k, num_fewshot: 4, gen_length: 256, steps: 256, block_length: 32}): its own keys override
evaluate_tasks' keyword defaults.  Each task runs in its own lm_eval.simple_evaluate call on one
shared DiffusionLM (the model is never reloaded).  The result, per task:

    {"metrics": {"acc": {"value": 0.41, "stderr": 0.02}, ...}, "n_samples": 200, "settings": {...}}

Task YAMLs are looked up in `include_path` (default configs/tasks); lm-eval's built-in tasks are indexed
too only when some requested task is not found there (indexing them takes ~25 s), unless
include_defaults says otherwise.
"""
from __future__ import annotations

import math
from pathlib import Path

from pipeline.evaluation.harness import DiffusionLM

DEFAULT_TASK_DIR = Path(__file__).resolve().parents[2] / "configs" / "tasks"
SAMPLER_KEYS = {"gen_length", "block_length", "steps", "temperature", "remasking"}
SPEC_KEYS = {"name", "num_fewshot", "limit", "mc_num", "cfg", "batch_size", "gen_kwargs"} | SAMPLER_KEYS


def normalize_spec(item: str | dict) -> dict:
    """A name or dict -> dict; sampler keys given at the top level move into gen_kwargs."""
    spec = {"name": item} if isinstance(item, str) else dict(item)
    unknown = set(spec) - SPEC_KEYS
    if "name" not in spec or unknown:
        raise ValueError(f"task spec {item!r}: needs `name`; allowed keys {sorted(SPEC_KEYS)}, got {sorted(unknown)}")
    top_level_sampler = {key: spec.pop(key) for key in SAMPLER_KEYS & set(spec)}
    if top_level_sampler:
        spec["gen_kwargs"] = {**(spec.get("gen_kwargs") or {}), **top_level_sampler}
    return spec


def task_manager_for(names: list[str], include_path, include_defaults: bool | None = None):
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in (include_path if isinstance(include_path, (list, tuple)) else [include_path])]
    if include_defaults is None:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
        include_defaults = True
    return TaskManager(include_path=paths, include_defaults=include_defaults)


def metrics_from_results(task_result: dict) -> dict[str, dict[str, float | None]]:
    """lm-eval's {'acc,none': v, 'acc_stderr,none': s, ...} -> {'acc': {'value': v, 'stderr': s}}."""
    metrics = {}
    for key, value in task_result.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filter_name = key.split(",", 1)
        name = metric if filter_name == "none" else f"{metric}[{filter_name}]"
        stderr = task_result.get(f"{metric}_stderr,{filter_name}")
        metrics[name] = {
            "value": _as_float(value),
            "stderr": _as_float(stderr),
        }
    return metrics


def per_item(samples: list[dict]) -> dict[str, dict[str, float]]:
    """{metric: {doc_id: value}} from lm-eval's logged samples (for paired dense-vs-pruned tests)."""
    out: dict[str, dict[str, float]] = {}
    for sample in samples:
        for key, value in sample.items():
            if key in ("doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
                       "doc_hash", "prompt_hash", "target_hash"):
                continue
            number = _as_float(value)
            if number is not None:
                out.setdefault(key, {})[str(sample.get("doc_id"))] = number
    return out


def _as_float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _task_settings(spec: dict, num_fewshot, limit, mc_num, cfg, batch_size, gen_kwargs, seed) -> dict:
    """One task's settings: its spec's values over the call's defaults."""
    settings = {
        "num_fewshot": spec.get("num_fewshot", num_fewshot),
        "limit": spec.get("limit", limit),
        "mc_num": int(spec.get("mc_num", mc_num)),
        "cfg": float(spec.get("cfg", cfg)),
        "batch_size": int(spec.get("batch_size", batch_size)),
        "gen_kwargs": {**(gen_kwargs or {}), **(spec.get("gen_kwargs") or {})},
        "seed": seed,
    }
    unknown = set(settings["gen_kwargs"]) - SAMPLER_KEYS
    if unknown:
        raise ValueError(f"gen_kwargs {sorted(unknown)} unknown; sampler settings are {sorted(SAMPLER_KEYS)}")
    return settings


def evaluate_tasks(
    model,
    tokenizer,
    mask_token_id: int | None,
    tasks: list[str | dict],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    mc_num: int = 128,
    cfg: float = 0.0,
    batch_size: int = 32,
    gen_kwargs: dict | None = None,
    include_path: str | Path | list = DEFAULT_TASK_DIR,
    include_defaults: bool | None = None,
    seed: int = 0,
    bootstrap_iters: int = 1000,
    greedy_check: str = "single",
    show_progress: bool | str = False,
    label: str = "",
) -> dict:
    """Run lm-eval on `model` (in memory) for each task; return {task: {metrics, n_samples, settings}}.

    gen_kwargs holds the diffusion sampler's settings for generate_until tasks (gen_length, block_length,
    steps, temperature, remasking); per-task dicts may override any of the keyword defaults.
    """
    import lm_eval

    from pipeline.evaluation.harness import quiet_git_hash

    quiet_git_hash()
    specs = [normalize_spec(t) for t in tasks]
    manager = task_manager_for([s["name"] for s in specs], include_path, include_defaults)
    lm = DiffusionLM(model=model, tokenizer=tokenizer, mask_token_id=mask_token_id, seed=seed,
                     greedy_check=greedy_check, show_progress=show_progress)
    sampler_defaults = {key: getattr(lm, key) for key in SAMPLER_KEYS}
    results = {}
    for spec in specs:
        settings = _task_settings(spec, num_fewshot, limit, mc_num, cfg, batch_size, gen_kwargs, seed)
        lm.mc_num, lm.cfg, lm.batch_size = settings["mc_num"], settings["cfg"], settings["batch_size"]
        lm.task_label = f"{label}{spec['name']}"
        for key, default in sampler_defaults.items():  # per task: defaults, then this task's overrides
            setattr(lm, key, type(default)(settings["gen_kwargs"].get(key, default)))
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[spec["name"]], num_fewshot=settings["num_fewshot"], limit=settings["limit"],
            task_manager=manager, bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, log_samples=True,
        )
        if out is None:  # a non-zero DDP rank: rank 0 holds the results
            continue
        for task_name, task_result in out["results"].items():
            n = out.get("n-samples", {}).get(task_name, {}).get("effective")
            results[task_name] = {"metrics": metrics_from_results(task_result), "n_samples": n,
                                  "settings": settings, "per_item": per_item(out.get("samples", {}).get(task_name, []))}
    return results


def _fmt(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "—"
    text = f"{entry['value']:.3f}"
    if entry.get("stderr") is not None:
        text += f"±{entry['stderr']:.3f}"
    return text


def paired_task_differences(dense: dict, pruned: dict) -> dict:
    """{task: {metric: paired_items(...) + within_noise}} from the per-item scores of both runs."""
    from pipeline.maths.metrics import paired_items, within_noise

    out: dict = {}
    for task in dense:
        d_items, p_items = dense[task].get("per_item", {}), pruned.get(task, {}).get("per_item", {})
        for metric in d_items:
            paired = paired_items(d_items[metric], p_items.get(metric, {}))
            if paired is not None:
                paired["within_noise"] = within_noise(paired["delta"], paired["stderr"])
                out.setdefault(task, {})[metric] = paired
    return out


def render_comparison(dense: dict, pruned: dict, *, title: str = "dense vs pruned"):
    """A rich Table: per task and metric, dense ± stderr, pruned ± stderr, and pruned − dense."""
    from rich.table import Table

    paired = paired_task_differences(dense, pruned)
    table = Table(title=title, caption="Δ ± paired s.e. over the same questions and Monte Carlo draws; "
                                       "'noise': |Δ| < 1.96 s.e.")
    for column, justify in (("task", "left"), ("metric", "left"), ("dense", "right"), ("pruned", "right"),
                            ("Δ (paired)", "right")):
        table.add_column(column, justify=justify, no_wrap=column != "task")
    for task in list(dict.fromkeys([*dense, *pruned])):
        dense_metrics = dense.get(task, {}).get("metrics", {})
        pruned_metrics = pruned.get(task, {}).get("metrics", {})
        for metric in list(dict.fromkeys([*dense_metrics, *pruned_metrics])):
            d, p = dense_metrics.get(metric), pruned_metrics.get(metric)
            delta = "—"
            if d and p and d.get("value") is not None and p.get("value") is not None:
                diff = p["value"] - d["value"]
                test = paired.get(task, {}).get(metric)
                noise = test is not None and test["within_noise"]
                style = "" if noise else "green" if diff > 0 else "red" if diff < 0 else ""
                delta = f"{diff:+.3f}"
                if test is not None and test["stderr"] is not None:
                    delta += f"±{test['stderr']:.3f}"
                if noise:
                    delta += " noise"
                delta = f"[{style}]{delta}[/{style}]" if style else delta
            table.add_row(task.replace("_offline", ""), metric, _fmt(d), _fmt(p), delta)
    return table



def paired_results(dense: dict, dense_windows: dict, pruned: dict, pruned_windows: dict) -> dict:
    """Pruned − dense on the same held-out windows (same masks) and the same questions, with paired s.e."""
    from pipeline.maths.metrics import paired_difference, within_noise

    out: dict = {}
    if dense_windows and "heldout" in pruned:
        heldout = paired_difference(dense_windows, pruned_windows)
        if heldout is not None:
            heldout["within_noise"] = within_noise(heldout["delta_nll"], heldout["stderr"])
            out["heldout"] = heldout
    if dense.get("tasks") and pruned.get("tasks"):
        out["tasks"] = paired_task_differences(dense["tasks"], pruned["tasks"])
    return out
