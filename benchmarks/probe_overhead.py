"""What AttentionMassProbe costs: forward time with vs without it, and its memory vs a naive softmax.

    python benchmarks/probe_overhead.py                      # minilm-dlm (+ tiny-llada if built), T=128, 512
    python benchmarks/probe_overhead.py --repeats 9 --lengths 128 512

Time: one sequence of random (non-special) tokens, plain and probed forwards interleaved (so drift in
machine load hits both alike), medians over --repeats after warm-up, 1 thread.
Memory: the probe's chunked recomputation of one attention call vs the naive materialisation of the full
[B, H, T, T] float32 scores and probabilities. Torch's CPU allocator bypasses Python's, so tracemalloc
cannot see it; each variant therefore runs in a fresh subprocess that resets its peak RSS (Linux
/proc/self/clear_refs; ru_maxrss would inherit the parent's peak across fork) and reports the rise of
VmHWM over the RSS before the call, next to the analytic bytes of the largest live temporaries.
Writes benchmarks/results/probe_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.maths.attention import AttentionMassProbe  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "probe_overhead.json"

# Run in a subprocess: allocate q, k, warm up, then measure the rise of peak RSS for one variant.
MEMORY_SCRIPT = r"""
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from pipeline.maths.attention import attention_mass
variant, B, H, T, D, chunk = sys.argv[2], *map(int, sys.argv[3:8])
g = torch.Generator().manual_seed(0)
q, k = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
def naive():  # what a plain "softmax(q kᵀ) then sum" does: the whole [B, H, T, T] at once
    probs = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, dim=-1)
    return probs.sum(dim=(1, 2))
def chunked():
    return attention_mass(q, k, chunk_size=chunk)
fn = naive if variant == "naive" else chunked
attention_mass(q[:, :, :4], k[:, :, :4])  # load kernels outside the measurement
def status_kib(field):
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(field + ":")))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status_kib("VmRSS")
fn()
print((status_kib("VmHWM") - before) * 1024)
"""


def random_ids(tokenizer, length: int, seed: int = 0) -> torch.Tensor:
    special = set(tokenizer.all_special_ids)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tokenizer), (1, length * 2), generator=g)[0]
    ids = torch.tensor([i for i in ids.tolist() if i not in special][:length])
    return ids[None, :]


def time_model(name: str, lengths, repeats: int, warmup: int = 2) -> list[dict]:
    from pipeline.model.loading import load_dlm

    model, tokenizer = load_dlm(name)
    rows = []
    for length in lengths:
        ids = random_ids(tokenizer, length)
        plain_t, probed_t = [], []
        with torch.no_grad():
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                model(input_ids=ids)
                t1 = time.perf_counter()
                with AttentionMassProbe() as probe:
                    model(input_ids=ids)
                t2 = time.perf_counter()
                probe.require_attention(model)
                if i >= warmup:
                    plain_t.append(t1 - t0)
                    probed_t.append(t2 - t1)
        plain, probed = statistics.median(plain_t), statistics.median(probed_t)
        rows.append({"model": name, "seq_len": length, "plain_ms": plain * 1e3, "probed_ms": probed * 1e3,
                     "ratio": probed / plain, "attention_calls": probe.calls, "repeats": repeats})
        print(f"{name:12s} T={length:4d}  plain {plain * 1e3:8.1f} ms  probed {probed * 1e3:8.1f} ms  ratio {probed / plain:5.2f}x")
    return rows


def measure_memory(batch: int, heads: int, length: int, head_dim: int, chunk: int) -> dict:
    measured = {}
    for variant in ("naive", "chunked"):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(ROOT), variant, str(batch), str(heads), str(length), str(head_dim), str(chunk)],
            capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        measured[variant] = int(out.stdout.strip().splitlines()[-1])
    rows = min(chunk, length)
    # largest simultaneously live float32 temporaries. naive: the scores and the scaled scores / the
    # probabilities (two [B, H, T, T]). chunked: one [B, H, c, T] buffer (softmax is done in place) and
    # its head sum [B, c, T]; the allocator's slack between chunks shows up only in the measured figure.
    naive_bytes = 2 * batch * heads * length * length * 4
    chunked_bytes = (batch * heads * rows * length + batch * rows * length) * 4
    row = {"batch": batch, "heads": heads, "seq_len": length, "head_dim": head_dim, "chunk_rows": rows,
           "naive_analytic_bytes": naive_bytes, "chunked_analytic_bytes": chunked_bytes,
           "naive_peak_rss_rise_bytes": measured["naive"], "chunked_peak_rss_rise_bytes": measured["chunked"],
           "analytic_ratio": naive_bytes / chunked_bytes,
           "measured_ratio": measured["naive"] / max(1, measured["chunked"])}
    print(f"memory B={batch} H={heads} T={length} chunk={rows}: naive {naive_bytes / 2**20:7.1f} MiB analytic, "
          f"{measured['naive'] / 2**20:7.1f} MiB measured | chunked {chunked_bytes / 2**20:6.1f} MiB analytic, "
          f"{measured['chunked'] / 2**20:6.1f} MiB measured")
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--chunk", type=int, default=128, help="query rows per chunk (the probe's default)")
    p.add_argument("--memory-lengths", type=int, nargs="+", default=[512, 1024, 2048])
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(1)

    from pipeline.evaluation.sink_report import zoo_model_missing

    timing, skipped = [], []
    for name in ("minilm-dlm", "tiny-llada"):
        missing = zoo_model_missing(name)
        if missing:
            print(missing)
            skipped.append(missing)
            continue
        try:
            timing += time_model(name, args.lengths, args.repeats)
        except Exception as exc:  # an optional zoo model still being built must not sink the benchmark
            if name == "minilm-dlm":
                raise
            skipped.append(f"{name}: {type(exc).__name__}: {exc}")
            print(skipped[-1])
    # MiniLM's attention shape (12 heads of 32); the probe's cost does not depend on the weights
    memory = [measure_memory(1, 12, length, 32, args.chunk) for length in args.memory_lengths]

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {"timing": timing, "memory": memory, "skipped": skipped, "threads": 1,
              "torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version(),
              "note": "timing ratios are probed/plain medians; memory is the rise of peak RSS (VmHWM) in a fresh subprocess"}
    tmp = RESULTS.with_name(f".{RESULTS.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(RESULTS)
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
