"""Held-out masked-diffusion perplexity after pruning: dense, magnitude, Wanda, sink-aware Wanda, SparseGPT,
sink-aware SparseGPT at 50/60/70% unstructured and 2:4, over several calibration seeds.

    python benchmarks/method_comparison.py                     # minilm-dlm, 3 seeds
    python benchmarks/method_comparison.py --model tiny-llada

One calibration pass per seed collects every statistic at once (plain and sink-weighted Wanda norms and
Hessians, from the same noised batches), so the methods differ only in what the paper changes: the
(1 − s) weighting.  Every pruned model is scored on the same held-out windows with the same masks
(seeded by window index), so differences between methods are paired.  Writes
benchmarks/results/method_comparison_<model>.json and prints a table of mean ± std over seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rich.console import Console
from rich.table import Table

from pipeline.model.calibration import noised_batches
from pipeline.model.calibration import target_linears
from pipeline.maths import sparsity as sp
from pipeline.maths.attention import AttentionMassProbe
from pipeline.model.data import CalibrationData
from pipeline.maths.diffusion import timestep_grid
from pipeline.model.loading import load_dlm, resolve_mask_token_id
from pipeline.maths.metrics import MaskedDiffusionPerplexity, elbo_nll
from pipeline.maths.sinks import sink_scores

SETTINGS = {"50%": (0.5, None), "60%": (0.6, None), "70%": (0.7, None), "2:4": (None, (2, 4))}
METHODS = ("magnitude", "wanda", "sink_wanda", "sparsegpt", "sink_sparsegpt")


@torch.no_grad()
def calibrate(model, layers, dm, mask_id, timesteps, seed, sink_std, sink_alpha):
    """Σ over samples and timesteps of plain and sink-weighted statistics, for every layer."""
    stats = {name: {"wanda": torch.zeros(m.in_features, dtype=torch.float64), "sink_wanda": torch.zeros(m.in_features, dtype=torch.float64),
                    "sparsegpt": torch.zeros(m.in_features, m.in_features), "sink_sparsegpt": torch.zeros(m.in_features, m.in_features)}
             for name, m in layers.items()}
    captured: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: captured.__setitem__(n, inp[0].detach().float()))
             for n, m in layers.items()]
    try:
        for batch in dm.train_dataloader():
            for nb in noised_batches(batch, timesteps, mask_id, seed=seed):
                with AttentionMassProbe() as probe:
                    model(input_ids=nb.input_ids)  # one pass: the probe and the hooks see the same forward
                keep = 1.0 - sink_scores(probe.mass, k=sink_std, alpha=sink_alpha)
                for name, x in captured.items():
                    s = stats[name]
                    # the same per-sample float32 statistics as PruneCallback, summed in float64
                    s["wanda"] += sp.sample_act_sq_sums(x).sum(0)
                    s["sink_wanda"] += sp.sample_act_sq_sums(x, keep).sum(0)
                    for b in range(x.shape[0]):
                        sp.add_sample_hessian_(s["sparsegpt"], x[b])
                        sp.add_sample_hessian_(s["sink_sparsegpt"], x[b], keep[b])
    finally:
        for h in hooks:
            h.remove()
    return stats


@torch.no_grad()
def prune_copy(layers, dense, stats, method, sparsity, n_m):
    for name, layer in layers.items():
        weight = dense[name].clone()
        if method == "magnitude":
            mask = sp.select_mask(sp.magnitude_scores(weight), sparsity, n_m)
        elif method.endswith("wanda"):
            mask = sp.select_mask(sp.wanda_scores(weight, stats[name][method]), sparsity, n_m)
        else:
            weight, mask, _ = sp.sparsegpt_prune(weight, stats[name][method], sparsity=sparsity, n_m=n_m)
        sp.apply_mask_(weight, mask)
        layer.weight.copy_(weight)


@torch.no_grad()
def heldout_nll(model, dm, mask_id, n_timesteps) -> float:
    metric = MaskedDiffusionPerplexity()
    for batch in dm.heldout_dataloader():
        nll, scored = elbo_nll(lambda ids: model(input_ids=ids).logits, batch["input_ids"], batch["keep"],
                               [int(i) for i in batch["index"]], mask_id, n_timesteps=n_timesteps, seed=0)
        metric.update(nll, scored)
    return metric.compute()["nll"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-dlm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--timesteps", type=int, default=10)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--heldout-timesteps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_dlm(args.model)
    mask_id = resolve_mask_token_id(tok, model.config)
    layers = target_linears(model)
    dense = {n: m.weight.detach().clone() for n, m in layers.items()}
    console = Console(width=140)
    results = {"dense": [], **{f"{m} {s}": [] for m in METHODS for s in SETTINGS}}
    t0 = time.time()
    for seed in args.seeds:
        dm = CalibrationData(tokenizer=args.model, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed,
                             batch_size=4, heldout_samples=args.heldout)
        dm.setup("fit")
        stats = calibrate(model, layers, dm, mask_id, timestep_grid(args.timesteps), seed, 2.0, 5.0)
        results["dense"].append(heldout_nll(model, dm, mask_id, args.heldout_timesteps))
        for method in METHODS:
            for label, (sparsity, n_m) in SETTINGS.items():
                prune_copy(layers, dense, stats, method, sparsity, n_m)
                results[f"{method} {label}"].append(heldout_nll(model, dm, mask_id, args.heldout_timesteps))
                console.print(f"seed {seed} {method:15s} {label:4s} NLL {results[f'{method} {label}'][-1]:.4f}  ({time.time() - t0:.0f}s)")
        with torch.no_grad():
            for n, m in layers.items():
                m.weight.copy_(dense[n])
    table = Table(title=f"{args.model}: held-out masked-diffusion NLL (nats/token), mean ± std over seeds {args.seeds}")
    table.add_column("method")
    for label in ["dense", *SETTINGS]:
        table.add_column(label, justify="right")
    fmt = lambda v: f"{statistics.mean(v):.4f} ± {statistics.pstdev(v):.4f}"  # noqa: E731
    table.add_row("dense", fmt(results["dense"]), *["" for _ in SETTINGS])
    for method in METHODS:
        table.add_row(method, "", *[fmt(results[f"{method} {s}"]) for s in SETTINGS])
    console.print(table)
    paired = {}
    for base in ("wanda", "sparsegpt"):
        for s in SETTINGS:
            diffs = [a - b for a, b in zip(results[f"sink_{base} {s}"], results[f"{base} {s}"])]
            paired[f"sink_{base} - {base} {s}"] = {"mean": statistics.mean(diffs), "per_seed": diffs}
    console.print({k: round(v["mean"], 4) for k, v in paired.items()})
    out = Path(__file__).parent / "results" / f"method_comparison_{args.model}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "nll": results, "sink_minus_plain": paired,
                               "seconds": time.time() - t0}, indent=1))


if __name__ == "__main__":
    main()
