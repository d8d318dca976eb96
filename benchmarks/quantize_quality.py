"""Held-out quality and size of pruned and quantized embedded models: dense, W4 (GPTQ int4, and round-to-nearest for
reference), FP8, 50% sink-Wanda, 50% sink-Wanda + W4, 2:4 sink-Wanda + W4; 3 calibration seeds, paired.

    python benchmarks/quantize_quality.py                          # minilm-dlm-rel, tiny-llada, tiny-llada-moe
    python benchmarks/quantize_quality.py --models tiny-llada --seeds 0

One calibration pass per (model, seed) collects, through the pipeline's own code (callbacks/layers.accumulate into
DDP-exact SlotSums, the same pruner objects), the sink-weighted Wanda statistic, the sink-weighted Hessian (for GPTQ
after sink-Wanda) and the plain Hessian (for GPTQ of the dense model: `method: dense` is not sink-aware).  Every
variant is scored on the same held-out windows with the same noise (seeded by window index), so differences from dense
are paired per window; "± s.e." is the standard error over the held-out windows (the same windows for every seed) of
each window's difference from dense, averaged over the seeds.
Bytes on disk: the model.safetensors that the run saves (compressed-tensors for the quantized variants; the
embeddings and the LM head stay in the model's dtype).  Group size: 128, or the largest power of two dividing every
width (tiny-llada 64, tiny-llada-moe 32).  Writes benchmarks/results/quantize_quality.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_model import load_for_calibration  # noqa: E402
from callbacks.layers import accumulate, find_targets, routed_tokens  # noqa: E402
from callbacks.quantize import fused_expert_layers  # noqa: E402
from callbacks.reduction import SlotSums  # noqa: E402
from pipeline.maths import sparsity as sp  # noqa: E402
from pipeline.maths.attention import AttentionMassProbe  # noqa: E402
from pipeline.maths.diffusion import timestep_grid  # noqa: E402
from pipeline.maths.gptq import gptq_quantize  # noqa: E402
from pipeline.maths.metrics import elbo_nll  # noqa: E402
from pipeline.maths.flavors import make_pruner  # noqa: E402
from pipeline.maths.quantize import Scheme, round_to_nearest  # noqa: E402
from pipeline.maths.sinks import sink_scores  # noqa: E402
from pipeline.model.calibration import noised_batches  # noqa: E402
from pipeline.model.data import CalibrationData  # noqa: E402

MODELS = ("minilm-dlm-rel", "tiny-llada", "tiny-llada-moe")
# variant: (pruning (sparsity, n_m) or None, quantization or None)
SEED_FREE = (None, "w4-rtn", "fp8")  # variants without calibration (scored once, reused for every seed)
VARIANTS = {
    "dense": (None, None), "W4 (RTN)": (None, "w4-rtn"), "W4": (None, "w4"), "FP8": (None, "fp8"),
    "50% sink-Wanda": ((0.5, None), None), "50% + W4": ((0.5, None), "w4"), "2:4 + W4": ((None, (2, 4)), "w4"),
}


def group_size_for(layers) -> int:
    g = 128
    while any(m.in_features % g for m in layers.values()):
        g //= 2
    return g


@torch.no_grad()
def calibrate(model, targets, dm, mask_id, timesteps, seed) -> dict[str, SlotSums]:
    """Σ over (window, timestep) of the sink-weighted Wanda statistic and Hessian and the plain Hessian."""
    pruners = {"sink_wanda": make_pruner("sink_wanda", 0.5), "sink_hessian": make_pruner("sink_sparsegpt", 0.5),
               "hessian": make_pruner("sparsegpt", 0.5)}
    sums = {k: SlotSums(8) for k in pruners}
    captured: dict[str, tuple] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: captured.__setitem__(
        n, (inp[0].detach(), routed_tokens(targets.experts, n)))) for n, m in targets.layers.items()]
    try:
        for batch in dm.train_dataloader():
            batch = {**batch, "keep": torch.zeros_like(batch["keep"])}  # every position masked (the reference's)
            for nb in noised_batches(batch, timesteps, mask_id, seed=seed):
                captured.clear()
                with AttentionMassProbe() as probe:
                    model(input_ids=nb.input_ids)  # one pass: the probe and the hooks see the same forward
                nb.sink_scores = sink_scores(probe.mass, k=2.0, alpha=5.0)
                for name, (x, routed) in captured.items():
                    for key, pruner in pruners.items():
                        accumulate(pruner, sums[key], name, x, routed, nb)
    finally:
        for h in hooks:
            h.remove()
    return sums


@torch.no_grad()
def heldout(model, dm, mask_id, n_timesteps) -> torch.Tensor:
    """Per held-out window: masked-diffusion NLL per token."""
    out = []
    for batch in dm.heldout_dataloader():
        keep = torch.zeros_like(batch["keep"])
        nll, scored = elbo_nll(lambda ids: model(input_ids=ids).logits, batch["input_ids"], keep,
                               [int(i) for i in batch["index"]], mask_id, n_timesteps=n_timesteps, seed=0)
        out.append(nll / scored)
    return torch.cat(out)


@torch.no_grad()
def apply_variant(layers, dense, totals, prune, quant, group_size) -> tuple[dict, Scheme | None]:
    """Set the layers to the variant's weights; returns (scales per layer, scheme) for the save."""
    scheme = None if quant is None else (Scheme.parse("fp8") if quant == "fp8" else Scheme.parse("w4a16", group_size=group_size))
    scales = {}
    for name, layer in layers.items():
        weight = dense[name].clone()
        mask = None
        if prune is not None:
            mask = sp.select_mask(sp.wanda_scores(weight.float(), totals["sink_wanda"][name]), *prune)
            sp.apply_mask_(weight, mask)
        if quant in ("w4", "fp8-gptq"):
            hessian = totals["sink_hessian" if prune is not None else "hessian"][name]
            weight, scales[name], _ = gptq_quantize(weight, hessian, scheme, mask)
        elif quant is not None:
            scales[name], weight = round_to_nearest(weight, scheme)
        layer.weight.copy_(weight)
    return scales, scheme


def disk_bytes(model, scales, scheme) -> int:
    from pipeline.run.compressed import save_compressed

    with tempfile.TemporaryDirectory() as tmp:
        if scheme is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            save_compressed(model, Path(tmp), scales, scheme)
        return sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))


def run_model(name: str, args) -> dict:
    model, _, mask_id, _ = load_for_calibration(name, args.threads)
    targets = find_targets(model, [], [], None, "sink_sparsegpt")
    fused = set(fused_expert_layers(model, targets.layers))  # quantized, saved dense (docs/quantize.md)
    layers = dict(targets.layers)
    dense = {n: m.weight.detach().clone() for n, m in layers.items()}
    group_size = group_size_for(layers)
    nll = {v: [] for v in VARIANTS}
    size = {}
    for seed in args.seeds:
        dm = CalibrationData(tokenizer=name, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed, batch_size=4,
                             heldout_samples=args.heldout)
        dm.setup("fit")
        sums = calibrate(model, targets, dm, mask_id, timestep_grid(args.timesteps), seed)
        totals = {k: {n: s.total(n) for n in layers} for k, s in sums.items()}
        for variant, (prune, quant) in VARIANTS.items():
            if nll[variant] and prune is None and quant in SEED_FREE:  # no calibration: the same weights every seed
                nll[variant].append(nll[variant][0])
                continue
            scales, scheme = apply_variant(layers, dense, totals, prune, quant, group_size)
            nll[variant].append(heldout(model, dm, mask_id, args.heldout_timesteps))
            if seed == args.seeds[0]:
                size[variant] = disk_bytes(model, {n: v for n, v in scales.items() if n not in fused}, scheme)
            print(f"{name} seed {seed} {variant:15s} NLL {nll[variant][-1].mean():.4f}", flush=True)
        with torch.no_grad():
            for n, m in layers.items():
                m.weight.copy_(dense[n])
    base = torch.stack(nll["dense"])  # [seeds, windows]; the held-out windows are the same for every seed
    rows = {}
    for variant in VARIANTS:
        values = torch.stack(nll[variant])
        diff = (values - base).mean(0)  # per window, averaged over the seeds
        rows[variant] = {"nll": float(values.mean()), "delta": float(diff.mean()),
                         "delta_se": float(diff.std() / math.sqrt(len(diff))) if variant != "dense" else 0.0,
                         "per_seed_nll": [float(v.mean()) for v in nll[variant]], "bytes": size[variant],
                         "per_window_nll": values.tolist()}
    return {"group_size": group_size, "windows_per_seed": args.heldout, "fused_expert_layers_saved_dense": len(fused),
            "variants": rows}


def markdown(results: dict) -> str:
    lines = []
    for name, r in results["models"].items():
        lines += [f"**{name}** (int4 groups of {r['group_size']})", "",
                  "| variant | held-out NLL | Δ vs dense ± s.e. | model.safetensors |", "|---|---|---|---|"]
        dense_bytes = r["variants"]["dense"]["bytes"]
        for v, row in r["variants"].items():
            delta = "" if v == "dense" else f"{row['delta']:+.4f} ± {row['delta_se']:.4f}"
            lines.append(f"| {v} | {row['nll']:.4f} | {delta} | {row['bytes'] / 2**20:.2f} MiB ({row['bytes'] / dense_bytes:.2f}×) |")
        lines.append("")
    return "\n".join(lines)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--markdown":
        print(markdown(json.loads(Path(sys.argv[2]).read_text())))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--timesteps", type=int, default=2)
    ap.add_argument("--heldout", type=int, default=12)
    ap.add_argument("--heldout-timesteps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "quantize_quality.json"))
    args = ap.parse_args()
    t0 = time.time()
    results = {"args": vars(args), "models": {m: run_model(m, args) for m in args.models}}
    results["seconds"] = time.time() - t0
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(markdown(results))
    print(f"wrote {args.json} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
