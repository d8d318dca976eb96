"""Calibration throughput (noised tokens per second) with 1 and 2 CPU processes (gloo), side by side.

    python benchmarks/ddp_throughput.py [--nsamples 16]

Runs `cli.py fit` on minilm-dlm with sink-aware Wanda for each world size (the same calibration set and
seed), reads the calibration time the run records, checks that the masks are identical, and writes
benchmarks/results/ddp_throughput.json.  This machine has 2 cores, so 2 processes share them: expect
little gain here.  On GPUs each rank has its own device and the per-step work is independent (the only
communication is one reduction of the statistics at the end), so throughput scales with the GPU count.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tests.runs import run_cli, tiny_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--timesteps", type=int, default=5)
    args = ap.parse_args()
    rows = {}
    with TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for devices in (1, 2):
            root = tmp / f"ws{devices}"
            trainer = {"devices": devices, **({"strategy": "calibration_ddp_spawn"} if devices > 1 else {})}
            config = tiny_config(root, nsamples=args.nsamples, seqlen=args.seqlen, timesteps=args.timesteps,
                                 batch_size=4, trainer_args=trainer)
            proc = run_cli(config, tmp)
            if proc.returncode:
                raise SystemExit(proc.stderr[-2000:])
            result = json.loads((root / "pruned" / "results.json").read_text())
            seconds = result["timings"]["calibration_s"]
            tokens = args.nsamples * args.seqlen * args.timesteps
            rows[devices] = {"calibration_s": seconds, "tokens_per_s": tokens / seconds,
                             "masks": load_file(str(root / "pruned" / "masks.safetensors"))}
        same = all(torch.equal(rows[1]["masks"][k], rows[2]["masks"][k]) for k in rows[1]["masks"])
    for r in rows.values():
        r.pop("masks")
    speedup = rows[2]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"1 process: {rows[1]['tokens_per_s']:.0f} tok/s   2 processes: {rows[2]['tokens_per_s']:.0f} tok/s   "
          f"ratio {speedup:.2f}x   masks identical: {same}")
    out = Path(__file__).parent / "results" / "ddp_throughput.json"
    out.write_text(json.dumps({"args": vars(args), "world_size": rows, "speedup": speedup, "masks_identical": same}, indent=1))


if __name__ == "__main__":
    main()
