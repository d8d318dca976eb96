"""Which of the reference's choices matter?  Starting from flavor=reference, switch one difference at a time.

    python benchmarks/reference_ablation.py --model minilm-dlm            # and --model tiny-llada
    python benchmarks/reference_ablation.py --markdown benchmarks/results/reference_ablation_minilm-dlm.json

The base row is PruneCallback(flavor="reference") with DLMModule(noise_order="reference"): what the reference
computes (at --batch-size 1 exactly; the default 4 keeps the CPU time down, the reference's noise order is then that
of its batch size 4 and its sink-Wanda norms stay per sample).  Each other row changes one row of README's
"Differences from the reference" table, as a small pruner variant (a subclass overriding one attribute, registered
below under its own flavour name) or one module option; "default" switches them all (this project's flavour,
one-shot, per-sample noise).  Every row is scored by the held-out masked-diffusion NLL of
benchmarks/method_comparison.py (`heldout_nll`, the same held-out windows and noise for every row of a seed), so
differences are paired by seed: reported per seed, their signs, mean ± sd.
Not switchable here (no effect on these fp32 CPU runs, or not a choice of the method): N:M handling (unstructured
runs), the probe's fp32 mass, single-pass, tie order, the (1 − s) precision, the calibration window sampler.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from method_comparison import heldout_nll  # noqa: E402  (the project's held-out NLL, reused as is)
from pipeline.maths.flavors import REFERENCE, register, with_noise_order  # noqa: E402
from pipeline.maths.pruners import ReferenceSinkSparseGPT, ReferenceSinkWanda, Wanda  # noqa: E402


# --- one switch each ----------------------------------------------------------------------------------------------

class RootSumSquaresSinkWanda(ReferenceSinkWanda):
    """Row 1: Wanda's statistic √(Σ (x(1−s))²) instead of the reference's sum of per-(sample, t) norms."""
    statistic = "act_sq_sum"
    batch_values, solve = Wanda.batch_values, Wanda.solve


class PerTimestepSinkSparseGPT(ReferenceSinkSparseGPT):
    """Row 3: H weighted by each timestep's scores, mean_t (1 − s_t)², not (1 − s̄)² (clean inputs kept)."""

    @staticmethod
    def score_term(scores):
        return (1.0 - scores) ** 2

    @staticmethod
    def mean_score(total, count):
        return 1.0 - (total / count).sqrt()  # 1 − this = √(mean_t (1 − s_t)²)


class NoisedSinkSparseGPT(ReferenceSinkSparseGPT):
    """Row 4: H from the noised x_t of every timestep (weighted by 1 − s̄) instead of the clean x_0."""
    inputs = "noised"


class RowThresholdSinkSparseGPT(ReferenceSinkSparseGPT):
    """Row 5: the same count pruned from every row instead of one threshold per 128-column block."""
    threshold = "row"


class OneShotSinkSparseGPT(ReferenceSinkSparseGPT):
    """Row 4/6: one-shot (every layer's H from the dense model) instead of layer-sequential."""
    mode = "oneshot"


VARIANTS = {  # flavour name -> (method, class): the reference flavour with that one class switched
    "ablate-root-sum-squares": ("sink_wanda", RootSumSquaresSinkWanda),
    "ablate-per-timestep-scores": ("sink_sparsegpt", PerTimestepSinkSparseGPT),
    "ablate-noised-inputs": ("sink_sparsegpt", NoisedSinkSparseGPT),
    "ablate-row-threshold": ("sink_sparsegpt", RowThresholdSinkSparseGPT),
    "ablate-one-shot": ("sink_sparsegpt", OneShotSinkSparseGPT),
}
for _flavor, (_method, _cls) in VARIANTS.items():
    register(replace(REFERENCE, name=_flavor, pruners={**REFERENCE.pruners, _method: _cls}))

# row label -> (method, flavour, noise order, mode); the first row of each method is its base
ROWS = {
    "sink_wanda": {
        "reference": ("reference", "reference", "oneshot"),
        "1: statistic √Σ(x(1−s))² (Wanda's)": ("ablate-root-sum-squares", "reference", "oneshot"),
        "8: per-sample noise": ("reference", "per_sample", "oneshot"),
        "default flavour (all switched)": ("default", "per_sample", "oneshot"),
    },
    "sink_sparsegpt": {
        "reference": ("reference", "reference", "sequential"),
        "3: per-timestep scores mean_t(1−s_t)²": ("ablate-per-timestep-scores", "reference", "sequential"),
        "4: noised inputs x_t (with s̄)": ("ablate-noised-inputs", "reference", "sequential"),
        "4: one-shot instead of layer-sequential": ("ablate-one-shot", "reference", "oneshot"),
        "5: row-wise count instead of block threshold": ("ablate-row-threshold", "reference", "sequential"),
        "8: per-sample noise": ("reference", "per_sample", "sequential"),
        "default flavour (all switched)": ("default", "per_sample", "oneshot"),
    },
}


# --- runs ---------------------------------------------------------------------------------------------------------

def prune_once(loaded, method: str, flavor: str, noise: str, mode: str, seed: int, a, workdir: Path):
    """Calibrate and prune the loaded model in place with PruneCallback; returns the held-out NLL."""
    import lightning as L

    from callbacks.prune import PruneCallback
    from callbacks.sink_stats import SinkStatsCallback
    from pipeline.model.data import CalibrationData
    from pipeline.model.module import DLMModule

    model, tokenizer, mask_id = loaded
    module = DLMModule(pretrained=a.model, timesteps=a.timesteps, seed=seed)
    module.model, module.tokenizer, module.mask_token_id = model, tokenizer, mask_id  # loaded once per model
    dm = CalibrationData(tokenizer=a.model, nsamples=a.nsamples, seqlen=a.seqlen, seed=seed, batch_size=a.batch_size,
                         heldout_samples=a.heldout)
    prune = PruneCallback(method=method, sparsity=0.5, flavor=with_noise_order(flavor, noise), mode=mode)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(workdir),
                        callbacks=[SinkStatsCallback(record=False, heatmap=False), prune])
    trainer.fit(module, datamodule=dm)
    return heldout_nll(model, dm, mask_id, a.heldout_timesteps)


def dense_nll(loaded, seed: int, a) -> float:
    from pipeline.model.data import CalibrationData

    dm = CalibrationData(tokenizer=a.model, nsamples=a.nsamples, seqlen=a.seqlen, seed=seed, batch_size=a.batch_size,
                         heldout_samples=a.heldout)
    dm.setup("fit")
    return heldout_nll(loaded[0], dm, loaded[2], a.heldout_timesteps)


def run(a) -> dict:
    from pipeline.model.calibration import target_linears
    from pipeline.model.loading import load_dlm, resolve_mask_token_id

    model, tokenizer = load_dlm(a.model)
    model.eval().requires_grad_(False)
    loaded = (model, tokenizer, resolve_mask_token_id(tokenizer, model.config))
    layers = target_linears(model)
    dense = {n: m.weight.detach().clone() for n, m in layers.items()}
    nll: dict[str, dict[str, list[float]]] = {"dense": {"dense": []}}
    t0 = time.time()
    for seed in a.seeds:
        nll["dense"]["dense"].append(dense_nll(loaded, seed, a))
        for method, rows in ROWS.items():
            for label, (flavor, noise, mode) in rows.items():
                with tempfile.TemporaryDirectory() as tmp:
                    value = prune_once(loaded, method, flavor, noise, mode, seed, a, Path(tmp))
                nll.setdefault(method, {}).setdefault(label, []).append(value)
                print(f"{a.model} seed {seed} {method:15s} {label:45s} NLL {value:.4f} ({time.time() - t0:.0f} s)",
                      flush=True)
                with torch.no_grad():
                    for n, m in layers.items():
                        m.weight.copy_(dense[n])
    return {"args": {k: v for k, v in vars(a).items() if k != "markdown"}, "nll": nll, "paired": paired(nll),
            "seconds": time.time() - t0}


def paired(nll: dict) -> dict:
    """Per method, each row − the reference row, per seed (positive = the switch raises the NLL: worse)."""
    out = {}
    for method, rows in nll.items():
        if method == "dense":
            continue
        base = rows["reference"]
        for label, values in rows.items():
            if label == "reference":
                continue
            diffs = [v - b for v, b in zip(values, base)]
            out.setdefault(method, {})[label] = {
                "per_seed": diffs, "signs": "".join("+" if d > 0 else "-" if d < 0 else "0" for d in diffs),
                "mean": statistics.mean(diffs), "sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0}
    return out


def markdown(path: Path) -> str:
    d = json.loads(path.read_text())
    args, nll = d["args"], d["nll"]
    dense = nll["dense"]["dense"]
    lines = [f"**{args['model']}** ({args['nsamples']} windows × T = {args['seqlen']}, {args['timesteps']} timesteps, "
             f"50% unstructured, batch size {args.get('batch_size', 1)}; held-out NLL on {args['heldout']} windows × "
             f"{args['heldout_timesteps']} timesteps; seeds "
             f"{', '.join(map(str, args['seeds']))}; dense {statistics.mean(dense):.4f})", "",
             "| method | row switched | NLL mean ± sd | − reference, per seed | signs | mean ± sd |",
             "|---|---|---:|---|---|---:|"]
    for method, rows in nll.items():
        if method == "dense":
            continue
        for label, values in rows.items():
            p = d["paired"][method].get(label)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            diff = ("(base)", "", "") if p is None else (
                " ".join(f"{x:+.4f}" for x in p["per_seed"]), p["signs"], f"{p['mean']:+.4f} ± {p['sd']:.4f}")
            lines.append(f"| {method} | {label} | {statistics.mean(values):.4f} ± {spread:.4f} | "
                         f"{diff[0]} | {diff[1]} | {diff[2]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm-dlm", choices=["minilm-dlm", "tiny-llada"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4,
                    help="calibration batch size (1 = the reference's default; its noise order is replayed at any "
                         "batch size)")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--timesteps", type=int, default=10)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--heldout-timesteps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", type=Path, default=None, help="render a results JSON as README's table and exit")
    a = ap.parse_args()
    if a.markdown:
        return print(markdown(a.markdown))
    if len(a.seeds) < 2:
        sys.exit("error: --seeds: give at least 2 seeds (paired differences need a spread); e.g. --seeds 0 1 2")
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    result = run(a)
    out = REPO / "benchmarks" / "results" / f"reference_ablation_{a.model}.json"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print(markdown(out))


if __name__ == "__main__":
    main()
