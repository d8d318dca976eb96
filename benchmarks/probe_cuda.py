"""The attention-mass probe on a CUDA GPU, at LLaDA-8B's attention shape (32 heads × 128, bf16 q/k/v).

    python benchmarks/probe_cuda.py                       # T = 512 .. 4096, batch 1
    python benchmarks/probe_cuda.py --seq-lens 2048 --batch 4

Per sequence length: the median time (CUDA events, after warm-up) of the model's own SDPA call, of the probe's
chunked fp32 mass (`pipeline.maths.attention.attention_mass`, the probe's CPU path; on CUDA it takes the fused
Triton kernel, timed by benchmarks/mass_kernel_cuda.py),
and of the reference's full-softmax mass (`pipeline.maths.reference.collector_attention_mass`, the bit-for-bit path); the peak
extra memory of each mass (torch.cuda.max_memory_allocated above the inputs); and the probe's largest relative error
against a float64 computation on the same bf16 inputs.  Writes benchmarks/results/probe_cuda.json.  Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.maths import reference  # noqa: E402
from pipeline.maths.attention import attention_mass  # noqa: E402
from tests.oracles import naive_attention_mass  # noqa: E402
from benchmarks.semi_structured_24 import cuda_median_ms  # noqa: E402  (CUDA-event medians, one definition)


def timed(fn, warmup: int, repeats: int) -> float:
    return cuda_median_ms(fn, warmup, repeats)[0]


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[128, 1024],
                    help="the probe's query rows per chunk (SinkStatsCallback.chunk_size; 128 is its default)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "probe_cuda.json"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_cuda.py needs a CUDA GPU")
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {a.batch}, {a.heads} heads x {a.head_dim}, bf16")
    print(f"{'T':>5} {'SDPA ms':>8} {'probe ms':>9} {'ratio':>6} {'ref-ops ms':>10} {'probe MiB':>9} {'ref-ops MiB':>11} {'max rel err':>11}")
    for T in a.seq_lens:
        g = torch.Generator(device="cuda").manual_seed(T)
        q, k, v = (torch.randn(a.batch, a.heads, T, a.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        row = {"T": T, "sdpa_ms": timed(lambda: F.scaled_dot_product_attention(q, k, v), a.warmup, a.repeats),
               "probe_ms": timed(lambda: attention_mass(q, k), a.warmup, a.repeats),
               "probe_ms_by_chunk": {c: timed(lambda: attention_mass(q, k, chunk_size=c, max_chunk_bytes=1 << 40), a.warmup,
                                              a.repeats) for c in a.chunk_sizes},
               "probe_peak_mib_by_chunk": {c: peak_mib(lambda: attention_mass(q, k, chunk_size=c, max_chunk_bytes=1 << 40))
                                           for c in a.chunk_sizes},
               "reference_ops_ms": timed(lambda: reference.collector_attention_mass(q, k), a.warmup, a.repeats),
               "probe_peak_mib": peak_mib(lambda: attention_mass(q, k)),
               "reference_ops_peak_mib": peak_mib(lambda: reference.collector_attention_mass(q, k))}
        exact = naive_attention_mass(q.double(), k.double()).double() if T <= 2048 else None
        row["max_rel_err"] = None if exact is None else float(((attention_mass(q, k).double() - exact).abs() / exact.abs()).max())
        rows.append(row)
        err = "—" if row["max_rel_err"] is None else f"{row['max_rel_err']:.1e}"
        print(f"{T:>5} {row['sdpa_ms']:>8.3f} {row['probe_ms']:>9.3f} {row['probe_ms'] / row['sdpa_ms']:>6.2f} "
              f"{row['reference_ops_ms']:>10.3f} {row['probe_peak_mib']:>9.1f} {row['reference_ops_peak_mib']:>11.1f} {err:>11}")
        print("      probe by chunk size (rows: ms, MiB): " + ", ".join(
            f"{c}: {row['probe_ms_by_chunk'][c]:.3f} ms, {row['probe_peak_mib_by_chunk'][c]:.0f} MiB" for c in a.chunk_sizes))
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": a.batch, "heads": a.heads,
            "head_dim": a.head_dim, "repeats": a.repeats}
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
