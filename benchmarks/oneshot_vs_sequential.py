"""One-shot vs layer-sequential calibration: memory of the statistics, peak process memory, time, quality.

    python benchmarks/oneshot_vs_sequential.py                  # minilm-dlm, SparseGPT and Wanda (± sink)
    python benchmarks/oneshot_vs_sequential.py --model tiny-llada --methods sink_sparsegpt

one-shot    one calibration epoch on the dense model; every targeted layer's statistic is alive at once
sequential  one epoch per transformer block; block k is calibrated on the outputs of blocks < k already
            pruned (SparseGPT's and Wanda's own default), and only block k's statistics are alive

Each variant is a real `cli.py fit` in its own process (same calibration set, seed and held-out windows),
so the peak RSS is the whole run's.  The statistic bytes are computed from the layer shapes: a Hessian is
in² float32 per reduction slot that holds samples.  The same arithmetic is printed for LLaDA-8B's shapes,
where it decides whether one-shot SparseGPT fits at all.  Writes benchmarks/results/oneshot_vs_sequential_<model>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from tempfile import TemporaryDirectory
from types import SimpleNamespace

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.runs import tiny_config  # noqa: E402

# LLaDA-8B-Base: 32 blocks, d_model 4096, MLP 12288; per block q/k/v (one shared input), attn_out and ff_proj/up_proj
# (one shared input) take 4096 inputs and ff_out takes 12288: one statistic per distinct input (callbacks/shared.py).
LLADA_8B_BLOCK_INPUTS = [4096] * 3 + [12288]
LLADA_8B_BLOCKS = 32


def statistic_bytes(block_inputs: list[list[int]], statistic: str, slots: int) -> dict:
    per_layer = (lambda d: d * d * 4) if statistic == "hessian" else (lambda d: d * 8)  # float32 Hessian slots, float64 norms
    per_block = [sum(per_layer(d) for d in dims) * slots for dims in block_inputs]
    return {"oneshot": sum(per_block), "sequential": max(per_block)}


def measured_run(config: dict, tmp: Path) -> dict:
    """`cli.py fit` under a small wrapper that reports the child's peak RSS."""
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    wrapper = ("import resource, subprocess, sys; "
               "rc = subprocess.call([sys.executable, 'cli.py', 'fit', '--config', sys.argv[1]]); "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", wrapper, str(path)], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-1500:] + proc.stderr[-1500:])
    peak_kb = int(proc.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    out_dir = Path(config["trainer"]["callbacks"][-1]["init_args"]["output_dir"])
    result = json.loads((out_dir / "results.json").read_text())
    return {"peak_rss_mib": peak_kb / 1024, "calibration_s": result["timings"]["calibration_s"],
            "dense_nll": result["dense"]["heldout"]["nll"], "pruned_nll": result["pruned"]["heldout"]["nll"],
            "sparsity": result["sparsity_report"]["total_sparsity"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-dlm")
    ap.add_argument("--methods", nargs="+", default=["sparsegpt", "sink_sparsegpt", "wanda", "sink_wanda"])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--timesteps", type=int, default=5)
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()

    from callbacks.shared import SharedInputs
    from pipeline.model.calibration import find_blocks, target_linears
    from pipeline.model.loading import load_dlm

    model, tokenizer = load_dlm(args.model)
    blocks, layers = find_blocks(model), target_linears(model)
    holder = SimpleNamespace(model=model.eval(), mask_token_id=tokenizer.mask_token_id)
    shared = SharedInputs.find(holder, layers, blocks[-1][1], eager=True)  # layers fed one tensor keep one statistic
    block_inputs = [[layers[n].in_features for n in layers if n.startswith(f"{p}.") and n not in shared.members] for p, _ in blocks]
    del model
    slots = min(8, args.nsamples)  # a slot holds a statistic only once a sample reaches it
    rows, console = [], Console(width=150)
    with TemporaryDirectory() as tmp:
        for method in args.methods:
            statistic = "hessian" if method.endswith("sparsegpt") else "act_sq_sum"
            computed = statistic_bytes(block_inputs, statistic, slots)
            llada = statistic_bytes([LLADA_8B_BLOCK_INPUTS] * LLADA_8B_BLOCKS, statistic, 8)
            for mode in ("oneshot", "sequential"):
                root = Path(tmp) / f"{method}-{mode}"
                config = tiny_config(root, method=method, sparsity=args.sparsity, nsamples=args.nsamples, seqlen=args.seqlen,
                                     timesteps=args.timesteps, batch_size=4, pretrained=args.model,
                                     prune_args={"mode": mode}, model_args={"heldout_timesteps": 4},
                                     data_args={"heldout_samples": 16})
                measured = measured_run(config, Path(tmp))
                rows.append({"method": method, "mode": mode, "statistics_mib": computed[mode] / 2**20,
                             "llada_8b_statistics_gib": llada[mode] / 2**30, **measured})
                console.print(rows[-1])
    table = Table(title=f"{args.model}: one-shot vs sequential calibration ({args.nsamples} windows × {args.timesteps} t, "
                        f"T={args.seqlen}, {args.sparsity:.0%} unstructured)")
    for col in ("method", "mode", "statistics (MiB)", "peak RSS (MiB)", "calibration (s)", "held-out NLL dense → pruned",
                "LLaDA-8B statistics (GiB, 8 slots)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["method"], r["mode"], f"{r['statistics_mib']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r['calibration_s']:.1f}",
                      f"{r['dense_nll']:.4f} → {r['pruned_nll']:.4f}", f"{r['llada_8b_statistics_gib']:.2f}")
    console.print(table)
    out = REPO / "benchmarks" / "results" / f"oneshot_vs_sequential_{args.model}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
