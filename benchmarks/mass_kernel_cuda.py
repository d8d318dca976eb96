"""The fused Triton attention mass on a CUDA GPU, against one SDPA call and the chunked fp32 mass.

    python benchmarks/mass_kernel_cuda.py                       # H200: 32 heads x 128, bf16, batch 1, T = 512 .. 4096
    python benchmarks/mass_kernel_cuda.py --device cpu --tiny   # checks the script on a CPU (Triton's interpreter)

Per sequence length, with no mask and with a [1, 1, T, T] block-causal bool mask (SDAR / LLaDA2's layout): the
median time (CUDA events, after warm-up) of the model's own SDPA call, of the Triton mass in each launch config
(pipeline/maths/attention_triton.py; both passes, and the mass pass alone given the log-sum-exp, which is all the
probe runs where it takes SDPA's own log-sum-exp), of the chunked mass (pipeline/maths/attention.py, the CPU path) and
of a whole probed SDPA call (output + mass, AttentionMassProbe's default on CUDA: the route it took, its time over one
SDPA call, and pipeline.maths.attention.FUSED_SDPA's verdicts); each mass's largest error against a float64
softmax relative to the largest mass (target <= 1e-5); whether two runs give the same bits; and whether the sink
sets (s >= 0.5 by pipeline.maths.sinks.sink_scores, default k and alpha) equal the chunked mass's.  The inputs carry
three planted sinks (keys 0, 1 and T/2 share a direction with every query), so the sink sets are not empty.
Without a mask it also measures the mass from the log-sum-exp that torch's flash-attention op returns with its
output (the kernel's second pass only), whether that op's output is bit for bit F.scaled_dot_product_attention's,
and what the pair costs next to SDPA alone.
First, the kernel's semantics on this device against float64 at a small odd shape (2 x 8 query heads over 2 key heads,
T = 300, bf16 and fp32): GQA, padding mask with query weights, block-causal mask, float mask, is_causal with
fewer queries, a fully masked row, NaN.  Writes benchmarks/results/mass_kernel_cuda.json (--json).  No model, nothing downloaded; about 30-60 s on an H200.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

# --device cpu runs the kernels in Triton's interpreter, which has to be chosen before triton is first imported
_argv = sys.argv[1:]
if "--device=cpu" in _argv or ("--device", "cpu") in zip(_argv, _argv[1:]):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.semi_structured_24 import cuda_median_ms  # noqa: E402  (CUDA-event medians, one definition)
from pipeline.maths import attention_triton  # noqa: E402
from pipeline.maths.attention import FUSED_SDPA, AttentionMassProbe, attention_mass  # noqa: E402
from tests.oracles import naive_attention_mass  # noqa: E402
from pipeline.maths.attention_triton import attention_mass_triton, row_logsumexp_triton  # noqa: E402
from pipeline.maths.sinks import sink_scores  # noqa: E402

# Block sizes / warps / pipeline stages tried on the GPU; the first is attention_triton.DEFAULT_CONFIG.
GPU_CONFIGS = {
    "m128_n64_w8_s2": {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 2},
    "m64_n64_w4_s3": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3},
    "m64_n128_w8_s3": {"block_m": 64, "block_n": 128, "num_warps": 8, "num_stages": 3},
    "m128_n128_w8_s4": {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 4},
    "m128_n64_w4_s4": {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 4},
}
TINY_CONFIGS = {"m16_n16": {"block_m": 16, "block_n": 16, "num_warps": 1, "num_stages": 1}}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: run the kernels in Triton's interpreter (use with --tiny; checks the script only)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: T = 24, 40; 4 heads x 16; float16")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default 512 1024 2048 4096")
    ap.add_argument("--heads", type=int, default=None, help="default 32")
    ap.add_argument("--head-dim", type=int, default=None, help="default 128")
    ap.add_argument("--block", type=int, default=None, help="block size of the block-causal mask (default 32)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "mass_kernel_cuda.json"))
    a = ap.parse_args()
    tiny = {"seq_lens": [24, 40], "heads": 4, "head_dim": 16, "block": 8}
    full = {"seq_lens": [512, 1024, 2048, 4096], "heads": 32, "head_dim": 128, "block": 32}
    for name, value in (tiny if a.tiny else full).items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    return a


def planted_sink_inputs(heads, length, head_dim, dtype, device, seed):
    """q, k, v of shape [1, H, T, D]: random, plus a shared direction that keys 0, 1 and T/2 carry strongly."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    direction = torch.randn(head_dim, generator=g)
    direction /= direction.norm()
    q = torch.randn(1, heads, length, head_dim, generator=g) + 3.0 * direction
    k = torch.randn(1, heads, length, head_dim, generator=g)
    for position, strength in ((0, 20.0), (1, 12.0), (length // 2, 8.0)):
        k[:, :, position] += strength * direction
    v = torch.randn(1, heads, length, head_dim, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def exact_mass(q, k, mask, rows=256):
    """[B, S] float64 softmax mass, queries in chunks so that T = 4096 at 32 heads fits (256 MiB per chunk)."""
    qd, kd = q.double(), k.double().transpose(-1, -2)
    mass = torch.zeros(q.shape[0], k.shape[2], dtype=torch.float64, device=q.device)
    for start in range(0, q.shape[2], rows):
        scores = qd[:, :, start:start + rows] @ kd / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask[..., start:start + rows, :], float("-inf"))
        mass += torch.softmax(scores, dim=-1).sum(dim=(1, 2))
    return mass


def semantic_checks(device, dtype, head_dim, length, config):
    """Name -> relative error against float64 (or True/False for the NaN check) of the kernel on this device."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q = (torch.randn(2, 8, length, head_dim, generator=g) * 2).to(device=device, dtype=dtype)
    k = (torch.randn(2, 2, length, head_dim, generator=g) * 2).to(device=device, dtype=dtype)
    valid = torch.arange(length, device=device)[None, :] < torch.tensor([length, length - 37], device=device)[:, None]
    blocks = torch.arange(length, device=device) // 32
    block_causal = ((blocks[:, None] >= blocks[None, :])[None] & valid[:, None, :])[:, None]  # [B, 1, L, S]
    bias = torch.randn(2, 8, length, length, generator=g).to(device)
    no_row = torch.ones(2, 1, length, length, dtype=torch.bool, device=device)
    no_row[0, :, 5] = False
    cases = {"gqa": ({}, {}), "padding+query_weights": ({"attn_mask": valid[:, None, None, :]},
                                                        {"query_weights": valid}),
             "block_causal+query_weights": ({"attn_mask": block_causal}, {"query_weights": valid}),
             "float_mask": ({"attn_mask": bias}, {}), "fully_masked_row": ({"attn_mask": no_row}, {})}
    results = {}
    for name, (mask, weights) in cases.items():
        mass = attention_mass_triton(q, k, mask.get("attn_mask"), **weights, **config)
        exact = naive_attention_mass(q.double(), k.double(), mask.get("attn_mask"),
                                     query_weights=weights.get("query_weights"))
        results[name] = relative_error(mass, exact)
    few = q[:, :, :77]
    results["is_causal_fewer_queries"] = relative_error(attention_mass_triton(few, k, is_causal=True, **config),
                                                        naive_attention_mass(few.double(), k.double(), is_causal=True))
    broken = q.clone()
    broken[1, 3, 7, 0] = float("nan")
    nan_mass = attention_mass_triton(broken, k, valid[:, None, None, :], **config)
    results["nan_gives_nan"] = bool(nan_mass[1].isnan().all() and nan_mass[0].isfinite().all())
    return results


def median_ms(fn, device, warmup, repeats):
    if device == "cuda":
        return cuda_median_ms(fn, warmup, repeats)[0]
    fn()
    times = []
    for _ in range(max(1, repeats // 5)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def relative_error(mass, exact):
    return float((mass.double() - exact).abs().max() / exact.abs().max())


def sink_set(mass):
    return (sink_scores(mass.float()) >= 0.5).nonzero()[:, 1].tolist()


def measure(a, configs, length, masked):
    device, dtype = a.device, (torch.float16 if a.tiny else torch.bfloat16)
    q, k, v = planted_sink_inputs(a.heads, length, a.head_dim, dtype, device, seed=length)
    mask = None
    if masked:
        blocks = torch.arange(length, device=device) // a.block
        mask = (blocks[:, None] >= blocks[None, :])[None, None]  # [1, 1, T, T]
    exact = exact_mass(q, k, mask)
    chunked = attention_mass(q, k, mask)
    row = {"T": length, "mask": "block_causal" if masked else None,
           "sdpa_ms": median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), device, a.warmup,
                                a.repeats),
           "chunked_ms": median_ms(lambda: attention_mass(q, k, mask), device, a.warmup, a.repeats),
           "chunked_rel_err": relative_error(chunked, exact), "sinks_chunked": sink_set(chunked), "triton": {}}

    def probed_call():
        with AttentionMassProbe() as probe:
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return probe

    # one GPU run has to tell everything: a config (or variant) that fails is recorded and the others still run
    row["probe"] = recorded(lambda: probe_figures(a, probed_call, exact, row))
    lse = row_logsumexp_triton(q, k, mask)  # for the mass pass alone
    for name, config in configs.items():
        row["triton"][name] = recorded(lambda: measure_config(a, q, k, mask, config, exact, row, lse))
    if not masked and device == "cuda":
        row["flash_lse"] = recorded(lambda: flash_lse_variant(a, q, k, v, exact, row, configs))
    return row


def recorded(measurement):
    try:
        return measurement()
    except Exception as error:  # noqa: BLE001  (reported in the table and the JSON)
        return {"error": repr(error)[:400]}


def probe_figures(a, probed_call, exact, row):
    probe = probed_call()  # the first call of its kind also verifies the fused route (FUSED_SDPA)
    ms = median_ms(probed_call, a.device, a.warmup, a.repeats)
    return {"uses": probe.calls_by_kernel, "call_ms": ms, "ratio_to_sdpa": ms / row["sdpa_ms"],
            "rel_err": relative_error(probe.mass, exact), "same_sinks_as_chunked": sink_set(probe.mass) == row[
                "sinks_chunked"]}


def measure_config(a, q, k, mask, config, exact, row, lse):
    first = attention_mass_triton(q, k, mask, **config)
    again = attention_mass_triton(q, k, mask, **config)
    ms = median_ms(lambda: attention_mass_triton(q, k, mask, **config), a.device, a.warmup, a.repeats)
    mass_pass_ms = median_ms(lambda: attention_mass_triton(q, k, mask, row_logsumexp=lse, **config), a.device,
                             a.warmup, a.repeats)
    return {"ms": ms, "ratio_to_sdpa": ms / row["sdpa_ms"], "mass_pass_ms": mass_pass_ms,
            "mass_pass_ratio_to_sdpa": mass_pass_ms / row["sdpa_ms"], "rel_err": relative_error(first, exact),
            "deterministic": bool(torch.equal(first, again)),
            "same_sinks_as_chunked": sink_set(first) == row["sinks_chunked"]}


def flash_lse_variant(a, q, k, v, exact, row, configs):
    """SDPA's flash op returns the row log-sum-exp with the output: then one Triton pass gives the mass."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    output, lse = flash(q, k, v)[:2]
    name = next(iter(configs))
    lse = lse[..., :q.shape[2]]
    mass = attention_mass_triton(q, k, row_logsumexp=lse, **configs[name])

    def output_and_mass():
        out, logsumexp = flash(q, k, v)[:2]
        return out, attention_mass_triton(q, k, row_logsumexp=logsumexp[..., :q.shape[2]], **configs[name])

    pair_ms = median_ms(output_and_mass, "cuda", a.warmup, a.repeats)
    same_bits = bool(torch.equal(output, F.scaled_dot_product_attention(q, k, v)))
    return {"config": name, "same_output_bits_as_sdpa": same_bits, "lse_shape": list(lse.shape),
            "rel_err": relative_error(mass, exact), "same_sinks_as_chunked": sink_set(mass) == row["sinks_chunked"],
            "mass_only_ms": median_ms(lambda: attention_mass_triton(q, k, row_logsumexp=lse, **configs[name]), "cuda",
                                      a.warmup, a.repeats),
            "output_and_mass_ms": pair_ms, "output_and_mass_ratio_to_sdpa": pair_ms / row["sdpa_ms"]}


def config_cell(r):
    if "error" in r:
        return f"FAILED {r['error']}"
    return (f"{r['ms']:.3f} {r['ratio_to_sdpa']:.2f}x {r['mass_pass_ms']:.3f} {r['mass_pass_ratio_to_sdpa']:.2f}x "
            f"{r['rel_err']:.1e} {'y' if r['deterministic'] else 'N'} {'y' if r['same_sinks_as_chunked'] else 'N'}")


def main() -> None:
    a = parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("mass_kernel_cuda.py: no CUDA GPU here; use --device cpu --tiny to check the script")
    if not attention_triton.AVAILABLE:
        sys.exit("mass_kernel_cuda.py: triton is not installed (pip install triton)")
    if a.device == "cpu" and not attention_triton.INTERPRETED:
        sys.exit("mass_kernel_cuda.py --device cpu: TRITON_INTERPRET must be 1 (the script sets it when unset)")
    configs = TINY_CONFIGS if a.tiny else GPU_CONFIGS
    if a.tiny:
        attention_triton.DEFAULT_CONFIG.update(TINY_CONFIGS["m16_n16"])
        attention_triton.FLOAT32_CONFIG.update(TINY_CONFIGS["m16_n16"])
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu (Triton interpreter)"
    print(f"{device_name}, torch {torch.__version__}, batch 1, {a.heads} heads x {a.head_dim}, "
          f"{'float16' if a.tiny else 'bfloat16'}; configs: {', '.join(configs)}")
    started = time.perf_counter()
    semantics = {}
    for dtype in ((torch.float16, torch.float32) if a.tiny else (torch.bfloat16, torch.float32)):
        name = str(dtype).removeprefix("torch.")
        # each dtype's default launch config (attention_triton.DEFAULT_CONFIG / FLOAT32_CONFIG), as the probe runs it
        semantics[name] = recorded(lambda: semantic_checks(a.device, dtype, a.head_dim, 40 if a.tiny else 300, {}))
        print(f"semantics, {name}: {semantics[name]}")
    semantics_ok = all("error" not in r and all(v is True or (v is not False and v <= 1e-5) for v in r.values())
                       for r in semantics.values())
    print(f"semantics within 1e-5 of float64, NaN kept: {semantics_ok}")
    print(f"{'T':>5} {'mask':>12} {'SDPA ms':>8} {'chunked':>8} {'probed':>8} {'/SDPA':>6} | per config: both passes "
          "ms, /SDPA, mass pass alone ms, /SDPA, rel err, same bits, same sinks")
    rows = []
    for masked in (False, True):
        for length in a.seq_lens:
            row = measure(a, configs, length, masked)
            rows.append(row)
            cells = "  ".join(f"{name}: {config_cell(r)}" for name, r in row["triton"].items())
            probe = row["probe"]
            probed = (f"{probe['call_ms']:>8.3f} {probe['ratio_to_sdpa']:>5.2f}x" if "call_ms" in probe
                      else f"{'failed':>15}")
            print(f"{length:>5} {row['mask'] or '-':>12} {row['sdpa_ms']:>8.3f} {row['chunked_ms']:>8.3f} "
                  f"{probed} | {cells}   sinks {row['sinks_chunked']}, chunked err {row['chunked_rel_err']:.1e}, "
                  f"probe {probe.get('uses', probe.get('error'))}")
            if "flash_lse" in row:
                print(f"      flash op's lse + one Triton pass: {row['flash_lse']}")
    working = [name for name in configs if not any("error" in r["triton"][name] for r in rows)]
    worst = {name: max(r["triton"][name]["ratio_to_sdpa"] for r in rows) for name in working}
    best = min(worst, key=worst.get) if worst else None
    # where the probe takes SDPA's own log-sum-exp, the mass pass alone is what it adds to the model's SDPA call
    worst_pass = {name: max(r["triton"][name]["mass_pass_ratio_to_sdpa"] for r in rows) for name in working}
    best_pass = min(worst_pass, key=worst_pass.get) if worst_pass else None
    probed = {f"{r['T']} {r['mask'] or '-'}": r["probe"].get("ratio_to_sdpa") for r in rows}
    checks = {"max_ratio_to_sdpa": worst.get(best),
              "max_rel_err": max(r["triton"][best]["rel_err"] for r in rows) if best else None,
              "deterministic": all(r["triton"][n]["deterministic"] for r in rows for n in working),
              "same_sinks_as_chunked": all(r["triton"][n]["same_sinks_as_chunked"] for r in rows for n in working),
              "failed_configs": [name for name in configs if name not in working]}
    if best is None:
        print("every config failed: see the errors above")
    else:
        print(f"best config {best} ({configs[best]}): worst ratio to SDPA {worst[best]:.2f}x (target <= 1.2x), "
              f"max rel err {checks['max_rel_err']:.1e} (target <= 1e-5), deterministic {checks['deterministic']}, "
              f"same sinks {checks['same_sinks_as_chunked']}, failed configs {checks['failed_configs']}")
        print(f"best config for the mass pass alone {best_pass} ({configs[best_pass]}): worst ratio to SDPA "
              f"{worst_pass[best_pass]:.2f}x; per config {({n: round(v, 2) for n, v in worst_pass.items()})}")
    print(f"probed SDPA call (output + mass, default config) / one SDPA call: "
          f"{({n: None if v is None else round(v, 2) for n, v in probed.items()})}")
    print(f"fused route verdicts (pipeline.maths.attention.FUSED_SDPA): {FUSED_SDPA.reports}")
    print(f"{time.perf_counter() - started:.0f} s")
    meta = {"device": device_name, "torch": torch.__version__, "triton": __import__("triton").__version__,
            "heads": a.heads, "head_dim": a.head_dim, "block_causal_block": a.block, "repeats": a.repeats,
            "configs": configs, "worst_ratio_by_config": worst, "best_config": best, "checks": checks,
            "worst_mass_pass_ratio_by_config": worst_pass, "best_mass_pass_config": best_pass,
            "probed_ratio_to_sdpa": probed, "fused_sdpa_verdicts": FUSED_SDPA.reports, "semantics_ok": semantics_ok}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"meta": meta, "semantics": semantics, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
