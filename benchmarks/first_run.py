"""Time the README's first command from a clean cache: `python benchmarks/first_run.py [--warm] [--config tiny_sink50]`.

A fresh temp SINKPRUNE_CACHE makes the run merge the embedded model and score the dense model, as on a
fresh install; --warm then runs it a second time on that cache (merged model, cached dense scores).
Prints the wall time of each run, the phase timings its results.json recorded, and the ratio of the wall
time to the calibration (+ pruning) time of the same run, with the load average before and after it (the
ratio is the figure to compare across machines; wall times only on a quiet one).
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


def load() -> float:
    return os.getloadavg()[0]


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
            before = load()
            wall = run_once(args.config, cache, out)
            results = json.loads((out / "pruned" / "results.json").read_text())
            rows.append((label, wall, results.get("timings", {}), results.get("phase_timings", {}), before, load()))
    print(f"{args.config} (machine: {os.cpu_count()} CPUs)")
    for label, wall, timings, phases, before, after in rows:
        calibration = timings.get("calibration_s") or float("nan")
        print(f"\n{label}: {wall:.1f} s wall clock, {wall / calibration:.1f}x its calibration "
              f"(load average {before:.1f} before, {after:.1f} after)")
        for name, seconds in (phases or {k: v for k, v in timings.items() if k.endswith("_s")}).items():
            print(f"  {name:<42} {seconds:7.1f} s")
        print(f"  {'other (start-up, imports, reports)':<42} {wall - sum((phases or {}).values()):7.1f} s")


if __name__ == "__main__":
    main()
