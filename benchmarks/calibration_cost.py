"""Cost of one sink-aware calibration step relative to a plain forward of the same batch.

    python benchmarks/calibration_cost.py                     # minilm-dlm at T = 128, 512
    python benchmarks/calibration_cost.py --model tiny-llada --seqlens 128 512 2048

Per noised batch it times, interleaved and repeated (medians):
  plain       model(x), the whole model with its LM head              the unit
(the calibration passes stop after the last transformer block, as the callbacks do: they need the
blocks' attention and Linear inputs, not the logits)
  two_pass    probed forward -> sink scores; hooked forward -> Σ((1−s)x)²   (PruneCallback default)
  single_pass probed forward that also captures Linear inputs -> same sums  (single_pass: true)
  naive       like two_pass, but the mass comes from explicit softmax(QKᵀ) over all T×T pairs
  two_pass_f64  session 1's two-pass, for comparison: full forwards (LM head included) and a float64 copy and
                reduction per sample and layer
  blocks_only   a plain forward that stops after the last block: 1 - this = the LM head's share
and the same for the SparseGPT statistic (Hessians).  It checks that all variants give the same
statistics, and writes benchmarks/results/calibration_cost_<model>.json.
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
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from types import SimpleNamespace

from pipeline.model.calibration import forward_through_blocks, last_block
from callbacks.reduction import SlotSums
from pipeline.maths import sparsity as sp
from pipeline.maths.attention import AttentionMassProbe
from tests.oracles import naive_attention_mass
from pipeline.maths.sinks import sink_scores
from benchmarks.bench_model import load_for_calibration
from tests import float64_statistics as f64


def accumulate(captured, weights, statistic) -> SlotSums:
    """What PruneCallback._accumulate does per noised batch: per-sample float32 statistics into reduction
    slots.  The float64 totals are taken once per layer at the end of calibration (see totals())."""
    sums = SlotSums(8)
    for name, x in captured.items():
        if statistic == "hessian":
            for b in range(x.shape[0]):
                sp.add_sample_hessian_(sums.accumulator(name, b, (x.shape[-1], x.shape[-1])), x[b], weights[b])
        else:
            for b, value in enumerate(sp.sample_act_sq_sums(x, weights)):
                sums.add(name, b, value)
    return sums


def totals(stats) -> dict:
    return {name: stats.total(name) for name in stats.keys()} if isinstance(stats, SlotSums) else stats


def accumulate_float64_loop(captured, weights, statistic):
    """The previous implementation (session 1): a float64 copy and reduction per sample and layer."""
    out = {}
    for name, x in captured.items():
        x = x.float()
        acc = f64.new_hessian(x.shape[-1]) if statistic == "hessian" else f64.new_act_sq_sum(x.shape[-1])
        for b in range(x.shape[0]):
            if statistic == "hessian":
                acc = f64.accumulate_hessian(acc, x[b], weights[b])
            else:
                acc = f64.accumulate_act_sq_sum(acc, x[b], weights[b])
        out[name] = acc
    return out


class NaiveMass:
    """Patch SDPA to also materialise the full [B, H, T, T] probabilities (the obvious implementation)."""

    def __enter__(self):
        self.original, self.mass = F.scaled_dot_product_attention, None

        def patched(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
            m = naive_attention_mass(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
            self.mass = m if self.mass is None else self.mass + m
            return self.original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

        torch.nn.functional.scaled_dot_product_attention = patched
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self.original


@torch.no_grad()
def variants(model, layers, ids, statistic):
    holder = SimpleNamespace(model=model)  # the callbacks' protocol: a module with .model
    stop = last_block(model)
    def capture_forward(probe_cls):
        captured = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: captured.__setitem__(n, i[0].detach())) for n, m in layers.items()]
        try:
            with probe_cls() as probe:
                forward_through_blocks(holder, ids, stop_after=stop)
        finally:
            for h in hooks:
                h.remove()
        return probe.mass, captured

    def plain():
        model(input_ids=ids)  # what a user's denoising step costs: the whole model, LM head included

    def blocks_only():
        forward_through_blocks(holder, ids, stop_after=stop)

    def two_pass(probe_cls=AttentionMassProbe, accumulate=accumulate, full=False):
        forward = (lambda: model(input_ids=ids)) if full else (lambda: forward_through_blocks(holder, ids, stop_after=stop))
        with probe_cls() as probe:
            forward()
        weights = 1.0 - sink_scores(probe.mass)
        captured = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: captured.__setitem__(n, i[0].detach())) for n, m in layers.items()]
        try:
            forward()
        finally:
            for h in hooks:
                h.remove()
        return accumulate(captured, weights, statistic)

    def single_pass():
        mass, captured = capture_forward(AttentionMassProbe)
        return accumulate(captured, 1.0 - sink_scores(mass), statistic)

    return {"plain": plain, "two_pass": two_pass, "single_pass": single_pass, "naive": lambda: two_pass(NaiveMass),
            "two_pass_f64": lambda: two_pass(accumulate=accumulate_float64_loop, full=True), "blocks_only": blocks_only}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-dlm")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    model, tok, mask_id, layers = load_for_calibration(args.model, args.threads)
    g = torch.Generator().manual_seed(0)
    rows, console = [], Console(width=140)
    for seqlen in args.seqlens:
        ids = torch.randint(1000, min(tok.vocab_size, 20000), (args.batch, seqlen), generator=g)
        ids[torch.rand(ids.shape, generator=g) < 0.5] = mask_id
        for statistic in ("act_sq_sum", "hessian"):
            fns = variants(model, layers, ids, statistic)
            reference = totals(fns["two_pass"]())
            agree = {name: max((totals(fns[name]())[k] - reference[k]).abs().max().item() / max(reference[k].abs().max().item(), 1e-30) for k in reference)
                     for name in ("single_pass", "naive", "two_pass_f64")}
            times = {name: [] for name in fns}
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(v) for name, v in times.items()}
            rows.append({"seqlen": seqlen, "statistic": statistic, "median_s": med,
                         "ratio_to_plain": {k: v / med["plain"] for k, v in med.items()},
                         "max_rel_diff_vs_two_pass": agree})
            console.print(rows[-1])
    table = Table(title=f"{args.model}: calibration step cost / plain forward (batch {args.batch}, {args.threads} thread(s), median of {args.repeats})")
    for col in ("T", "statistic", "plain (s)", "blocks only", "two-pass", "single-pass", "naive T×T", "session-1 two-pass",
                "single-pass agrees", "naive agrees", "f64 loop agrees"):
        table.add_column(col, justify="right")
    for r in rows:
        q = r["ratio_to_plain"]
        table.add_row(str(r["seqlen"]), r["statistic"], f"{r['median_s']['plain']:.3f}", f"{q['blocks_only']:.2f}x", f"{q['two_pass']:.2f}x", f"{q['single_pass']:.2f}x",
                      f"{q['naive']:.2f}x", f"{q['two_pass_f64']:.2f}x", *(f"{r['max_rel_diff_vs_two_pass'][k]:.1e}" for k in ("single_pass", "naive", "two_pass_f64")))
    console.print(table)
    out = Path(__file__).parent / "results" / f"calibration_cost_{args.model}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
