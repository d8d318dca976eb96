"""Offloaded calibration on one GPU: an LLaDA-8B-shaped model (all 32 blocks, random bf16 weights built in GPU memory
from the embedded tiny-llada remote code scaled to 8B dims; nothing downloaded) calibrated with sink-Wanda, resident
(offload="none") and then block by block from CPU memory (offload="cpu"; the cached block inputs on the device as
the plan allows, then forced into pinned CPU memory), on the same weights and windows.

Reported: peak GPU memory of each run against the formula
    one block + embeddings and head + activations + statistics       (the issue's bound; the planner adds the
                                                                      prefetched second block and the cached batch)
the planner's prediction, the weight bytes the offloader counted on the device, the time ratio offload / resident
(target <= 1.5) and whether the masks agree bit for bit.

    python benchmarks/offload_cuda.py                        # H200: about 2-3 minutes (build, three calibrations)
    python benchmarks/offload_cuda.py --device cpu --tiny    # toy size, seconds
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import lightning as L
import torch

from callbacks.prune import PruneCallback
from callbacks.sink_stats import SinkStatsCallback
from pipeline.model import memory_plan as mp
from pipeline.model.loading import ZOO_DIR, restore_non_persistent_buffers
from pipeline.model.module import DLMModule

LLADA_8B = dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
                embedding_size=126464, max_sequence_length=4096, rope_theta=500000.0)
TINY = dict(d_model=64, n_heads=4, n_kv_heads=4, n_layers=4, mlp_hidden_size=128, vocab_size=512, embedding_size=512,
            max_sequence_length=512)
MASK_ID = 126336


def build_model(dims: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """The tiny-llada remote-code class at `dims`, built on the meta device and materialised on `device` (no CPU
    copy, no init pass), weights ~ N(0, 0.02) from a seeded generator on the device, norms 1."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(ZOO_DIR / "tiny_llada"), trust_remote_code=True)
    for k, v in dims.items():
        setattr(config, k, v)
    config.torch_dtype = dtype
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=True)
    model.to(dtype)  # (on the meta device: free)
    model.to_empty(device=device)
    restore_non_persistent_buffers(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    return model.eval().requires_grad_(False)


class InMemoryDLM(DLMModule):
    """DLMModule around a model already in memory (the benchmark's), instead of one loaded from a checkpoint."""
    model_in_memory = None
    park_inputs: bool | None = None  # force the cached block inputs into pinned CPU memory (True) or not (None: plan)

    def configure_model(self):
        if self.model is not None:
            return
        self.model, self.mask_token_id = InMemoryDLM.model_in_memory, MASK_ID % self.model_in_memory.config.vocab_size
        self._plan_memory()
        if self.offloader is not None and InMemoryDLM.park_inputs is not None:
            self.offloader.park_inputs = InMemoryDLM.park_inputs


class Windows(L.LightningDataModule):
    def __init__(self, windows: torch.Tensor):
        super().__init__()
        self.save_hyperparameters({"nsamples": len(windows), "seqlen": windows.shape[1], "batch_size": 1})  # (the plan reads them)
        self.windows = windows

    def train_dataloader(self):
        items = [{"input_ids": w, "keep": torch.zeros_like(w, dtype=torch.bool), "index": i} for i, w in enumerate(self.windows)]
        return torch.utils.data.DataLoader(items, batch_size=1, collate_fn=lambda b: {
            "input_ids": torch.stack([x["input_ids"] for x in b]), "keep": torch.stack([x["keep"] for x in b]),
            "index": torch.tensor([x["index"] for x in b])})


def calibrate(offload: str, windows: torch.Tensor, timesteps: int, device: torch.device) -> dict:
    module = InMemoryDLM(pretrained="tiny-llada", timesteps=timesteps, offload=offload)
    prune = PruneCallback(method="sink_wanda", sparsity=0.5)
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, callbacks=[SinkStatsCallback(record=False, heatmap=False), prune])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.time()
    trainer.fit(module, datamodule=Windows(windows))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, calibration = time.time() - start, time.time() - prune.info["timings"]["calibration_start"]
    report = module.memory_report()
    if module.offloader is not None:  # (the next run's module makes its own)
        module.offloader.close()
    return {"offload": offload, "seconds": calibration, "fit_seconds": seconds, "masks": prune.masks, "plan": module.memory_plan,
            "measured_peak_bytes": report.get("measured_device_peak_bytes"), "offloader": report.get("offloader")}


def restore(model, dense: dict) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in dense:
                p.data.copy_(dense[name])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy dims (a CPU check)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--timesteps", type=int, default=10)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--json", default="benchmarks/results/offload_cuda.json")
    a = ap.parse_args()
    device = torch.device(a.device)
    dims, seqlen = (TINY, min(a.seqlen, 32)) if a.tiny else (LLADA_8B, a.seqlen)
    dtype = getattr(torch, a.dtype) if a.dtype else torch.float32 if device.type == "cpu" else torch.bfloat16
    t0 = time.time()
    model = build_model(dims, device, dtype, seed=0)
    build_s = time.time() - t0
    dense = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if ".blocks." in n}
    generator = torch.Generator().manual_seed(0)
    vocab = dims["vocab_size"]
    windows = torch.randint(0, vocab - 1, (a.windows, seqlen), generator=generator)
    windows[windows == MASK_ID % vocab] = 0
    InMemoryDLM.model_in_memory = model
    calibrate("none", windows[:1], 1, device)  # warm-up: kernels compiled and loaded before anything is timed
    runs = {}
    for label, offload, park in (("resident", "none", None), ("offload=cpu", "cpu", None), ("cpu+parked", "cpu", True)):
        gc.collect()  # the previous run's trainer and statistics (reference cycles) leave the device first
        if device.type == "cuda":
            torch.cuda.empty_cache()
        restore(model, dense)
        InMemoryDLM.park_inputs = park
        runs[label] = calibrate(offload, windows, a.timesteps, device)
    res, off = runs["resident"], runs["offload=cpu"]
    same = {label: r["masks"].keys() == res["masks"].keys() and all(torch.equal(res["masks"][k], r["masks"][k]) for k in res["masks"])
            for label, r in runs.items()}
    plan = off["plan"]
    # the formula: one block + embeddings and head + activations + statistics (of one block's layers)
    cal = mp.Calibration(statistic="act_sq_sum", windows=a.windows, timesteps=a.timesteps, seqlen=seqlen)
    shape = mp.shape_from_model(model, [b for b in model.model.transformer.blocks], "llada-8b-shaped")
    formula = (shape.resident_bytes + shape.block_bytes + mp.activation_bytes(shape, cal)
               + mp.statistic_bytes(shape.linear_inputs, cal, 1))
    rows = list(runs.items())
    print(f"\n{'run':<12} {'calib. s':>8} {'fit s':>8} {'peak GPU':>10} {'planned':>10}")
    for label, r in rows:
        print(f"{label:<12} {r['seconds']:>8.1f} {r['fit_seconds']:>8.1f} {mp.gib(r['measured_peak_bytes']):>10} "
              f"{mp.gib(r['plan']['predicted_device_peak_bytes'] if r['plan']['offload'] != 'none' else r['plan']['resident_device_peak_bytes']):>10}")
    ratio = {label: r["seconds"] / res["seconds"] for label, r in runs.items()}
    print(f"formula (1 block + embeddings/head + activations + statistics): {mp.gib(formula)}; "
          f"offloader counted weights on the device: {mp.gib(off['offloader']['peak_weight_bytes_on_device'])}; "
          f"block inputs kept on the {off['offloader']['block_inputs_on']} (cpu+parked: pinned CPU memory)")
    print(f"time / resident: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()) + " (target <= 1.5); "
          f"masks bit-identical to resident: {same}; model built in {build_s:.1f} s")
    import transformers

    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "dtype": str(dtype),
           "dims": dims, "windows": a.windows, "seqlen": seqlen, "timesteps": a.timesteps, "method": "sink_wanda",
           "model_bytes": shape.model_bytes, "block_bytes": shape.block_bytes, "resident_bytes": shape.resident_bytes,
           "formula_bytes": formula, "time_ratio": ratio, "masks_identical": same, "build_s": build_s,
           "runs": {k: {kk: vv for kk, vv in r.items() if kk != "masks"} for k, r in runs.items()}}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
