"""Peak bytes of SparseGPT's Hessian statistics in one process: windows slot by slot (each completed reduction slot
folded into its float64 total) against the natural order (every slot alive until the solve), same masks.

    python benchmarks/hessian_slots.py                       # tiny-llada, 16 windows, 8 slots, batch 1, 2 timesteps

Counts the tensors SlotSums holds whenever a slot is created (float32 slots; float64 totals, in host memory for
one-shot) and checks that both orders give the same masks; then prints the same arithmetic at LLaDA-8B's shapes
(one block: q/k/v share a 4096-input Hessian, attn_out 4096, ff/up 4096, ff_out 12288).
Writes benchmarks/results/hessian_slots.json (or --json).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from tempfile import TemporaryDirectory

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLADA_8B_BLOCK_INPUTS = [4096, 4096, 4096, 12288]  # one Hessian per distinct input (callbacks/shared.py)


def config(root: Path, args, mode: str) -> dict:
    return {
        "model": {"class_path": "pipeline.model.module.DLMModule",
                  "init_args": {"pretrained": args.model, "timesteps": args.timesteps, "heldout_timesteps": 1}},
        "data": {"class_path": "pipeline.model.data.CalibrationData",
                 "init_args": {"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size,
                               "heldout_samples": 1}},
        "trainer": {"default_root_dir": str(root), "accelerator": "cpu", "devices": 1, "callbacks": [
            {"class_path": "callbacks.sink_stats.SinkStatsCallback", "init_args": {"output_dir": str(root / "sinks")}},
            {"class_path": "callbacks.prune.PruneCallback",
             "init_args": {"method": "sink_sparsegpt", "sparsity": 0.5, "mode": mode, "reduction_slots": args.slots}},
            {"class_path": "callbacks.evaluate.EvaluateExportCallback",
             "init_args": {"output_dir": str(root / "pruned"), "cache_dense": False, "score_dense": False}}]},
    }


def run(root: Path, args, mode: str, slot_major: bool) -> dict:
    import cli
    from callbacks.reduction import SlotSums
    from pipeline.model.data import CalibrationData
    from safetensors.torch import load_file

    peak = {"slots_per_layer": 0, "slots": 0, "slot_bytes": 0, "total_bytes": 0, "bytes": 0}
    accumulator, order_by_slot = SlotSums.accumulator, CalibrationData.order_by_slot

    def counting(sums, key, sample_id, *a, **k):
        out = accumulator(sums, key, sample_id, *a, **k)
        slots = [t for per_key in sums.sums.values() for t in per_key.values()]
        totals = [t for _, t in sums.folded.values() if t is not None]
        now = {"slots_per_layer": len(sums.sums[key]), "slots": len(slots),
               "slot_bytes": sum(t.numel() * t.element_size() for t in slots),
               "total_bytes": sum(t.numel() * t.element_size() for t in totals)}
        now["bytes"] = now["slot_bytes"] + now["total_bytes"]
        for k_, v in now.items():
            peak[k_] = max(peak[k_], v)
        return out

    SlotSums.accumulator = counting
    if not slot_major:
        CalibrationData.order_by_slot = lambda self, *a, **k: False
    path = root.parent / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(config(root, args, mode)))
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()) as err:
            try:
                cli.main(["fit", "--config", str(path)])
            except SystemExit as exc:
                if exc.code:
                    raise RuntimeError(err.getvalue()[-2000:]) from None
    finally:
        SlotSums.accumulator, CalibrationData.order_by_slot = accumulator, order_by_slot
    masks = load_file(str(root / "pruned" / "masks.safetensors"))
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].numpy().tobytes())
    return {**peak, "masks_sha256": h.hexdigest()}


def llada_8b(blocks: int, slots: int) -> dict:
    slot = sum(d * d for d in LLADA_8B_BLOCK_INPUTS) * 4  # one float32 slot of one block
    return {"before_oneshot_device": blocks * slots * slot, "before_sequential_device": slots * slot,
            "after_oneshot_device": blocks * slot, "after_oneshot_host": blocks * 2 * slot,
            "after_sequential_device": 3 * slot}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llada")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--timesteps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "hessian_slots.json"))
    args = ap.parse_args()
    rows = []
    with TemporaryDirectory() as tmp:
        for mode in ("oneshot", "sequential"):
            for slot_major in (False, True):
                r = run(Path(tmp) / f"{mode}-{slot_major}", args, mode, slot_major)
                rows.append({"mode": mode, "order": "slot by slot" if slot_major else "natural (before)", **r})
    print(f"{args.model}: sink_sparsegpt, {args.nsamples} windows × {args.timesteps} t, T={args.seqlen}, "
          f"batch {args.batch_size}, {args.slots} slots")
    print(f"{'mode':<11} {'order':<17} {'slots/layer':>11} {'slots':>6} {'peak KiB (slots + f64 totals)':>30}  masks")
    for r in rows:
        print(f"{r['mode']:<11} {r['order']:<17} {r['slots_per_layer']:>11} {r['slots']:>6} "
              f"{r['bytes'] / 1024:>12.0f} ({r['slot_bytes'] / 1024:.0f} + {r['total_bytes'] / 1024:.0f}){'':>6} {r['masks_sha256'][:12]}")
    for mode in ("oneshot", "sequential"):
        a, b = (r["masks_sha256"] for r in rows if r["mode"] == mode)
        print(f"{mode}: masks {'identical' if a == b else 'DIFFER'}")
    gib = {k: v / 2**30 for k, v in llada_8b(4, args.slots).items()}
    print("LLaDA-8B shapes, first 4 blocks, batch 1 (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in gib.items()))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "llada_8b_4_blocks_gib": gib,
                               "llada_8b_32_blocks_gib": {k: v / 2**30 for k, v in llada_8b(32, args.slots).items()}}, indent=1))


if __name__ == "__main__":
    main()
