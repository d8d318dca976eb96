"""Held-out masked-diffusion perplexity after pruning: dense, magnitude, Wanda, sink-aware Wanda, SparseGPT,
sink-aware SparseGPT at 50/60/70% unstructured and 2:4, over several calibration seeds.

    python benchmarks/method_comparison.py                     # minilm-dlm, 3 seeds
    python benchmarks/method_comparison.py --model minilm-dlm-rel
    python benchmarks/method_comparison.py --model tiny-llada
    python benchmarks/method_comparison.py --owl              # OWL vs uniform layer targets (docs/owl.md)

The forward process masks every position (the reference's), `--keep-special` never masks the leading
[CLS]/BOS.  Also reported: per-seed paired differences sink − plain with their signs and a paired t-test,
the fraction of mask entries where the sink-aware and plain masks differ, and the distribution of the
sink scores s over every calibration (window, timestep, position).

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
from pipeline.maths import allocation
from pipeline.maths import sparsity as sp
from pipeline.maths.attention import AttentionMassProbe
from pipeline.model.data import CalibrationData
from pipeline.maths.diffusion import timestep_grid
from pipeline.maths.metrics import MaskedDiffusionPerplexity, elbo_nll
from pipeline.maths.sinks import sink_scores
from benchmarks.bench_model import load_for_calibration

S_BINS = [0.0, 0.01, 0.5, 0.99, 1.0 + 1e-6]  # s < 0.01, 0.01-0.5, 0.5-0.99, >= 0.99
SETTINGS = {"50%": (0.5, None), "60%": (0.6, None), "70%": (0.7, None), "2:4": (None, (2, 4))}
METHODS = ("wanda", "sink_wanda", "sparsegpt", "sink_sparsegpt")


@torch.no_grad()
def calibrate(model, layers, dm, mask_id, timesteps, seed, sink_std, sink_alpha, keep_special=False):
    """Σ over samples and timesteps of plain and sink-weighted statistics, for every layer; and the
    histogram of the sink scores (counts per S_BINS bin)."""
    stats = {name: {"wanda": torch.zeros(m.in_features, dtype=torch.float64), "sink_wanda": torch.zeros(m.in_features, dtype=torch.float64),
                    "sparsegpt": torch.zeros(m.in_features, m.in_features), "sink_sparsegpt": torch.zeros(m.in_features, m.in_features)}
             for name, m in layers.items()}
    captured: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: captured.__setitem__(n, inp[0].detach().float()))
             for n, m in layers.items()]
    s_hist = torch.zeros(len(S_BINS) - 1, dtype=torch.long)
    try:
        for batch in dm.train_dataloader():
            if not keep_special:
                batch = {**batch, "keep": torch.zeros_like(batch["keep"])}
            for nb in noised_batches(batch, timesteps, mask_id, seed=seed):
                with AttentionMassProbe() as probe:
                    model(input_ids=nb.input_ids)  # one pass: the probe and the hooks see the same forward
                scores = sink_scores(probe.mass, k=sink_std, alpha=sink_alpha)
                s_hist += torch.histogram(scores.flatten().float(), bins=torch.tensor(S_BINS)).hist.long()
                keep = 1.0 - scores
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
    return stats, s_hist


@torch.no_grad()
def prune_copy(layers, dense, stats, method, sparsity, n_m, targets=None) -> dict[str, torch.Tensor]:
    """Prune every layer from its dense weight; `targets` (layer -> fraction) overrides `sparsity` per layer."""
    masks = {}
    for name, layer in layers.items():
        weight = dense[name].clone()
        sparsity = sparsity if targets is None else targets[name]
        if method == "magnitude":
            mask = sp.select_mask(sp.magnitude_scores(weight), sparsity, n_m)
        elif method.endswith("wanda"):
            mask = sp.select_mask(sp.wanda_scores(weight, stats[name][method]), sparsity, n_m)
        else:
            weight, mask, _ = sp.sparsegpt_prune(weight, stats[name][method], sparsity=sparsity, n_m=n_m)
        sp.apply_mask_(weight, mask)
        layer.weight.copy_(weight)
        masks[name] = mask.bool()
    return masks


@torch.no_grad()
def owl_layer_targets(model, layers, dense, stats, method, average, lmbda, m) -> dict[str, float]:
    """PruneCallback's OWL rule (callbacks/layers.owl_targets) on this benchmark's statistics: per block, the outlier
    ratio of the Wanda scores |W|·√(Σ(w x)²) (w = 1 − s for sink methods; SparseGPT: the Hessian's diagonal)."""
    from pipeline.model.calibration import find_blocks

    blocks = [[n for n in layers if n.startswith(f"{prefix}.")] for prefix, _ in find_blocks(model)]
    blocks = [names for names in blocks if names]
    ratios, sizes = [], []
    for names in blocks:
        stat = lambda n: stats[n][method] if method.endswith("wanda") else stats[n][method].diagonal().double()  # noqa: E731
        ratios.append(allocation.outlier_ratio([sp.wanda_scores(dense[n].float(), stat(n)) for n in names], m))
        sizes.append(sum(dense[n].numel() for n in names))
    per_block = allocation.owl_targets(ratios, sizes, average, lmbda)
    return {n: t for names, t in zip(blocks, per_block) for n in names}


def run_owl_seed(model, tok_name, layers, dense, mask_id, seed, args, console, t0) -> dict:
    """One calibration seed: every method at each --owl-sparsity, with uniform and with OWL layer targets."""
    dm = CalibrationData(tokenizer=tok_name, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed,
                         batch_size=4, heldout_samples=args.heldout)
    dm.setup("fit")
    stats, _ = calibrate(model, layers, dm, mask_id, timestep_grid(args.timesteps), seed, 2.0, 5.0, args.keep_special)
    score = lambda: heldout_nll(model, dm, mask_id, args.heldout_timesteps, args.keep_special)  # noqa: E731
    out = {"nll": {"dense": score()}, "targets": {}}
    for sparsity in args.owl_sparsity:
        for method in METHODS:
            targets = owl_layer_targets(model, layers, dense, stats, method, sparsity, args.owl_lambda, args.owl_m)
            out["targets"][f"{method} {sparsity:.0%}"] = targets
            for profile, per_layer in (("uniform", None), ("owl", targets)):
                prune_copy(layers, dense, stats, method, sparsity, None, per_layer)
                key = f"{method} {profile} {sparsity:.0%}"
                out["nll"][key] = score()
                console.print(f"seed {seed} {key:28s} NLL {out['nll'][key]:.4f}  ({time.time() - t0:.0f}s)")
    with torch.no_grad():
        for n, m in layers.items():
            m.weight.copy_(dense[n])
    return out


def owl_rows(per_seed: list[dict], sparsities) -> dict:
    """owl − uniform per method and sparsity: per-seed paired differences, signs, mean, and the noise floor
    (2 standard errors of the mean difference over seeds): |mean| under it is not a measured effect."""
    rows = {}
    for sparsity in sparsities:
        for method in METHODS:
            diffs = [r["nll"][f"{method} owl {sparsity:.0%}"] - r["nll"][f"{method} uniform {sparsity:.0%}"] for r in per_seed]
            mean = statistics.mean(diffs)
            floor = 2 * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
            rows[f"{method} {sparsity:.0%}"] = {
                "per_seed": diffs, "signs": "".join("+" if d > 0 else "-" if d < 0 else "0" for d in diffs),
                "mean": mean, "noise_floor": floor, "within_noise": floor is None or abs(mean) <= floor,
                "uniform": statistics.mean(r["nll"][f"{method} uniform {sparsity:.0%}"] for r in per_seed),
                "owl": statistics.mean(r["nll"][f"{method} owl {sparsity:.0%}"] for r in per_seed)}
    return rows


def owl_markdown(d: dict) -> str:
    """docs/owl.md's table from the --owl results JSON."""
    dense = statistics.mean(r["nll"]["dense"] for r in d["per_seed"])
    lines = [f"{d['args']['model']}, seeds {d['args']['seeds']}, dense NLL {dense:.4f} nats/token; OWL λ = "
             f"{d['args']['owl_lambda']}, M = {d['args']['owl_m']}", "",
             "| method, sparsity | uniform | OWL | OWL − uniform per seed | signs | mean | noise floor | |",
             "|---|---:|---:|---|---|---:|---:|---|"]
    for name, r in d["owl_minus_uniform"].items():
        floor = "n/a" if r["noise_floor"] is None else f"{r['noise_floor']:.4f}"
        lines.append(f"| {name} | {r['uniform']:.4f} | {r['owl']:.4f} | {' '.join(f'{x:+.4f}' for x in r['per_seed'])} | "
                     f"{r['signs']} | {r['mean']:+.4f} | {floor} | {'within noise' if r['within_noise'] else 'measured'} |")
    return "\n".join(lines)


def mask_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Fraction of all mask entries (every layer) where a and b differ."""
    return sum(int((a[n] != b[n]).sum()) for n in a) / sum(m.numel() for m in a.values())


@torch.no_grad()
def heldout_nll(model, dm, mask_id, n_timesteps, keep_special=False) -> float:
    metric = MaskedDiffusionPerplexity()
    for batch in dm.heldout_dataloader():
        keep = batch["keep"] if keep_special else torch.zeros_like(batch["keep"])
        nll, scored = elbo_nll(lambda ids: model(input_ids=ids).logits, batch["input_ids"], keep,
                               [int(i) for i in batch["index"]], mask_id, n_timesteps=n_timesteps, seed=0)
        metric.update(nll, scored)
    return metric.compute()["nll"]


def run_seed(model, tok_name, layers, dense, mask_id, seed, args, console, t0) -> dict:
    """One calibration seed: dense NLL, every method × setting's NLL, sink-vs-plain mask differences, s histogram."""
    dm = CalibrationData(tokenizer=tok_name, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed,
                         batch_size=4, heldout_samples=args.heldout)
    dm.setup("fit")
    stats, s_hist = calibrate(model, layers, dm, mask_id, timestep_grid(args.timesteps), seed, 2.0, 5.0, args.keep_special)
    score = lambda: heldout_nll(model, dm, mask_id, args.heldout_timesteps, args.keep_special)  # noqa: E731
    out = {"nll": {"dense": score()}, "mask_difference": {}, "s_histogram": s_hist.tolist()}
    for label, (sparsity, n_m) in SETTINGS.items():
        masks = {}
        for method in METHODS:
            masks[method] = prune_copy(layers, dense, stats, method, sparsity, n_m)
            out["nll"][f"{method} {label}"] = score()
            console.print(f"seed {seed} {method:15s} {label:4s} NLL {out['nll'][f'{method} {label}']:.4f}  ({time.time() - t0:.0f}s)")
        for base in ("wanda", "sparsegpt"):
            out["mask_difference"][f"{base} {label}"] = mask_difference(masks[f"sink_{base}"], masks[base])
    with torch.no_grad():
        for n, m in layers.items():
            m.weight.copy_(dense[n])
    return out


def paired_rows(per_seed: list[dict]) -> dict:
    """sink − plain per setting: per-seed differences, signs, mean, paired t-test, mask difference."""
    from scipy.stats import ttest_rel

    rows = {}
    for base in ("wanda", "sparsegpt"):
        for label in SETTINGS:
            sink = [r["nll"][f"sink_{base} {label}"] for r in per_seed]
            plain = [r["nll"][f"{base} {label}"] for r in per_seed]
            diffs = [a - b for a, b in zip(sink, plain)]
            p = float(ttest_rel(sink, plain).pvalue) if len(diffs) > 1 and len(set(diffs)) > 1 else None
            rows[f"sink_{base} - {base} {label}"] = {
                "per_seed": diffs, "signs": "".join("+" if d > 0 else "-" if d < 0 else "0" for d in diffs),
                "mean": statistics.mean(diffs), "paired_t_p": p,
                "mask_entries_differ": statistics.mean(r["mask_difference"][f"{base} {label}"] for r in per_seed),
            }
    return rows


def render(model_name: str, seeds, per_seed: list[dict], paired: dict, hist: list[int]) -> list[Table]:
    table = Table(title=f"{model_name}: held-out masked-diffusion NLL (nats/token), mean ± std over seeds {seeds}")
    table.add_column("method")
    for label in ["dense", *SETTINGS]:
        table.add_column(label, justify="right")
    fmt = lambda v: f"{statistics.mean(v):.4f} ± {statistics.pstdev(v):.4f}"  # noqa: E731
    table.add_row("dense", fmt([r["nll"]["dense"] for r in per_seed]), *["" for _ in SETTINGS])
    for method in METHODS:
        table.add_row(method, "", *[fmt([r["nll"][f"{method} {s}"] for r in per_seed]) for s in SETTINGS])
    diff = Table(title=f"{model_name}: sink-aware − plain, paired by seed (negative = sink-aware better)")
    for col in ("comparison", "per seed", "signs", "mean", "paired t p", "mask entries differ"):
        diff.add_column(col, justify="left" if col == "comparison" else "right")
    for name, r in paired.items():
        diff.add_row(name, " ".join(f"{d:+.4f}" for d in r["per_seed"]), r["signs"], f"{r['mean']:+.4f}",
                     "n/a" if r["paired_t_p"] is None else f"{r['paired_t_p']:.3f}", f"{r['mask_entries_differ']:.2%}")
    total = sum(hist)
    shares = ", ".join(f"[{lo:g}, {hi:.2g}): {c / total:.2%}" for lo, hi, c in zip(S_BINS, S_BINS[1:], hist))
    diff.caption = f"sink scores s over every calibration (window, timestep, position): {shares}"
    return [table, diff]


def markdown(path: Path) -> str:
    """The README's tables from a results JSON: NLL mean ± std over seeds, and sink − plain paired by seed."""
    d = json.loads(Path(path).read_text())
    per_seed, paired, hist = d["per_seed"], d["sink_minus_plain"], d["s_histogram"]["counts"]
    fmt = lambda v: f"{statistics.mean(v):.4f} ± {statistics.pstdev(v):.4f}"  # noqa: E731
    lines = [f"dense: {fmt([r['nll']['dense'] for r in per_seed])} nats/token, seeds {d['args']['seeds']}", "",
             "| method | " + " | ".join(SETTINGS) + " |", "|---|" + "---:|" * len(SETTINGS)]
    lines += [f"| {m} | " + " | ".join(fmt([r["nll"][f"{m} {s}"] for r in per_seed]) for s in SETTINGS) + " |" for m in METHODS]
    lines += ["", "| sink-aware − plain | per seed | signs | mean | paired t p | mask entries differ |", "|---|---|---|---:|---:|---:|"]
    for name, r in paired.items():
        p = "n/a" if r["paired_t_p"] is None else f"{r['paired_t_p']:.3f}"
        lines.append(f"| {name} | {' '.join(f'{x:+.4f}' for x in r['per_seed'])} | {r['signs']} | {r['mean']:+.4f} | {p} | "
                     f"{r['mask_entries_differ']:.2%} |")
    total = sum(hist)
    lines += ["", "sink scores s: " + ", ".join(f"{lab} {c / total:.2%}" for lab, c in
                                                 zip(("< 0.01", "0.01–0.5", "0.5–0.99", "≥ 0.99"), hist))]
    return "\n".join(lines)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--markdown":
        d = json.loads(Path(sys.argv[2]).read_text())
        print(owl_markdown(d) if "owl_minus_uniform" in d else markdown(Path(sys.argv[2])))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-dlm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--timesteps", type=int, default=10)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--heldout-timesteps", type=int, default=8)
    ap.add_argument("--keep-special", action="store_true", help="never mask the leading [CLS]/BOS (default: mask every position)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--owl", action="store_true", help="OWL vs uniform layer targets instead of the method grid")
    ap.add_argument("--owl-sparsity", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--owl-lambda", type=float, default=0.08)
    ap.add_argument("--owl-m", type=float, default=5.0)
    args = ap.parse_args()
    model, tok, mask_id, layers = load_for_calibration(args.model, args.threads)
    dense = {n: m.weight.detach().clone() for n, m in layers.items()}
    console = Console(width=160)
    t0 = time.time()
    if args.owl:
        return owl_main(model, layers, dense, mask_id, args, console, t0)
    per_seed = [run_seed(model, args.model, layers, dense, mask_id, seed, args, console, t0) for seed in args.seeds]
    paired = paired_rows(per_seed)
    hist = [sum(col) for col in zip(*(r["s_histogram"] for r in per_seed))]
    for table in render(args.model, args.seeds, per_seed, paired, hist):
        console.print(table)
    out = Path(__file__).parent / "results" / f"method_comparison_{args.model}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "per_seed": per_seed, "sink_minus_plain": paired,
                               "s_histogram": {"bins": S_BINS, "counts": hist}, "seconds": time.time() - t0}, indent=1))


def owl_main(model, layers, dense, mask_id, args, console, t0) -> None:
    per_seed = [run_owl_seed(model, args.model, layers, dense, mask_id, seed, args, console, t0) for seed in args.seeds]
    result = {"args": vars(args), "per_seed": per_seed, "owl_minus_uniform": owl_rows(per_seed, args.owl_sparsity),
              "seconds": time.time() - t0}
    out = Path(__file__).parent / "results" / f"owl_{args.model}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    console.print(owl_markdown(result))


if __name__ == "__main__":
    main()
