"""Time the README's first command from a clean cache: `python benchmarks/first_run.py [--warm] [--config tiny_sink50]`.

A fresh temp SINKPRUNE_CACHE makes the run merge the embedded model and score the dense model, as on a
fresh install; --warm then runs it a second time on that cache (merged model, cached dense scores).
Prints the wall time of each run and the phase timings its results.json recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_once(config: str, cache: Path, out: Path) -> float:
    env = dict(os.environ, SINKPRUNE_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.time()
    done = subprocess.run([sys.executable, "cli.py", "fit", "--config", config, "--output", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    wall = time.time() - start
    if done.returncode:
        sys.exit(f"run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_sink50.yaml")
    parser.add_argument("--warm", action="store_true", help="also time a second run on the same cache")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sinkprune-first-run-") as tmp:
        cache, rows = Path(tmp) / "cache", []
        for label in ("fresh cache", "warm cache")[: 2 if args.warm else 1]:
            out = Path(tmp) / label.replace(" ", "_")
            wall = run_once(args.config, cache, out)
            results = json.loads((out / "pruned" / "results.json").read_text())
            rows.append((label, wall, results.get("timings", {}), results.get("phase_timings", {})))
    print(f"{args.config} (machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f})")
    for label, wall, timings, phases in rows:
        print(f"\n{label}: {wall:.1f} s wall clock")
        for name, seconds in (phases or {k: v for k, v in timings.items() if k.endswith("_s")}).items():
            print(f"  {name:<42} {seconds:7.1f} s")


if __name__ == "__main__":
    main()
