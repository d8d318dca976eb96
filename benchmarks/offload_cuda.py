"""Offloaded calibration on one GPU: an LLaDA-8B-shaped model (all 32 blocks, random bf16 weights built in GPU memory
from the embedded tiny-llada remote code scaled to 8B dims; nothing downloaded) calibrated block by block from CPU
memory (offload="cpu") with sink-Wanda and with sink-SparseGPT, and the memory plan's predicted peak printed beside
the measured one, phase by phase (pipeline/model/memory_plan.py: offload_phases):

    full forward      the short structural forwards at fit start: embeddings and head + 2 blocks (one prefetched)
    block inputs      the forward up to the first block, once per batch: embeddings (+ the cached inputs)
    statistics pass   the mass pass and the hooked pass: 2 blocks + activations + statistics (+ the cached inputs)
    solve             one layer at a time: 2 blocks + the solver's workspace (+ the cached inputs)

Measured: torch.cuda.max_memory_allocated, reset at each phase boundary; on the CPU (--device cpu) the bytes of the
tensors alive, counted op by op (tests/live_bytes.py), plus the offloader's count of weights on the device (the CPU
prefetches nothing: a block less than planned).  --resident adds the resident sink-Wanda run (time ratio, masks
bit-identical), --parked a sink-Wanda run with the cached block inputs forced into pinned CPU memory.

    python benchmarks/offload_cuda.py                        # H200: about 90 s (build, warm-up, two calibrations)
    python benchmarks/offload_cuda.py --resident --parked    # + about 45 s
    python benchmarks/offload_cuda.py --device cpu --tiny    # toy size, seconds
"""
from __future__ import annotations

import argparse
import contextlib
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


def scaled(dims: dict, by: int) -> dict:
    """dims with the widths, heads and vocabulary divided by `by` (head size and depth kept)."""
    keys = ("d_model", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size")
    return {**dims, **{k: dims[k] // by for k in keys}}


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
        self.on_offloader()

    def on_offloader(self):  # (the benchmark's meter replaces it)
        pass


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


class PhasePeaks:
    """Peak device bytes per phase of a calibration: the offloader's boundaries (`outer_on`) and PruneCallback's
    solves (`_solve`) close one phase and open the next.  CUDA: max_memory_allocated, reset at each boundary; CPU:
    LiveBytes (tests/live_bytes.py) plus the offloader's weights minus the masks (which a GPU run keeps in CPU memory)."""

    def __init__(self, device: torch.device, module, prune):
        self.device, self.module, self.prune, self.peaks, self.phase = device, module, prune, {}, "full forward"
        self.count = None
        if device.type == "cpu":
            from tests.live_bytes import LiveBytes

            self.count = LiveBytes(extra=self._weights_less_masks)

    def _weights_less_masks(self) -> int:
        offloader = self.module.offloader
        weights = offloader.device_bytes if offloader is not None else sum(
            t.numel() * t.element_size() for t in (*self.module.model.parameters(), *self.module.model.buffers()))
        return weights - sum(m.numel() * m.element_size() for m in self.prune.masks.values())

    def _peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.count is None else self.count.peak

    def switch(self, phase: str) -> None:
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self._peak())
        self._reset()
        self.phase = phase

    def _reset(self) -> None:
        if self.count is None:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.count.peak = self.count.live + self.count.extra()

    def watch(self) -> None:
        """Called once the plan is made and the offloader exists (configure_model): what came before (the model
        built whole on the device) is not the run's."""
        self._reset()
        offloader, solve = self.module.offloader, self.prune._solve
        if offloader is not None:
            outer_on = offloader.outer_on
            names = {"inputs": "block inputs", "none": "statistics pass", "all": "full forward"}

            def boundary(which):  # (a phase starts once the weights it does without have left, before others arrive)
                if which == "all":
                    self.switch(names[which])
                outer_on(which)
                if which != "all":
                    self.switch(names[which])

            offloader.outer_on = boundary

        def solving(names):
            back = self.phase
            self.switch("solve")
            solve(names)
            self.switch(back)

        self.prune._solve = solving


def calibrate(method: str, offload: str, windows: torch.Tensor, timesteps: int, device: torch.device) -> dict:
    module = InMemoryDLM(pretrained="tiny-llada", timesteps=timesteps, offload=offload)
    prune = PruneCallback(method=method, sparsity=0.5)
    meter = PhasePeaks(device, module, prune)
    module.on_offloader = meter.watch
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, callbacks=[SinkStatsCallback(record=False, heatmap=False), prune])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.time()
    with meter.count if meter.count is not None else contextlib.nullcontext():
        trainer.fit(module, datamodule=Windows(windows))
    if device.type == "cuda":
        torch.cuda.synchronize()
    meter.switch("done")
    seconds, calibration = time.time() - start, time.time() - prune.info["timings"]["calibration_start"]
    report = module.memory_report()
    if module.offloader is not None:  # (the next run's module makes its own)
        module.offloader.close()
    plan = module.memory_plan
    predicted = plan["offload_device_peak_bytes"] if plan["offload"] != "none" else plan["resident_device_peak_bytes"]
    return {"method": method, "offload": offload, "seconds": calibration, "fit_seconds": seconds, "masks": prune.masks,
            "plan": plan, "predicted_peak_bytes": predicted, "measured_peak_bytes": max(meter.peaks.values()),
            "measured_phases": meter.peaks, "offloader": report.get("offloader")}


def restore(model, dense: dict) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in dense:
                p.data.copy_(dense[name])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy dims (a CPU check)")
    ap.add_argument("--scale", type=int, default=1, help="LLaDA-8B's widths and vocabulary divided by this (a CPU count)")
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: LLaDA-8B's 32)")
    ap.add_argument("--windows", type=int, default=4, help="sink-Wanda's calibration windows")
    ap.add_argument("--sparsegpt-windows", type=int, default=2, help="sink-SparseGPT's (its solves dominate)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--timesteps", type=int, default=10)
    ap.add_argument("--resident", action="store_true", help="also the resident sink-Wanda run (time ratio, masks)")
    ap.add_argument("--parked", action="store_true", help="also sink-Wanda with the block inputs in pinned CPU memory")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--json", default="benchmarks/results/offload_cuda.json")
    a = ap.parse_args()
    device = torch.device(a.device)
    dims, seqlen = (TINY, min(a.seqlen, 32)) if a.tiny else (scaled(LLADA_8B, a.scale), a.seqlen)
    dims = {**dims, "n_layers": a.layers or dims["n_layers"]}
    dtype = getattr(torch, a.dtype) if a.dtype else torch.float32 if device.type == "cpu" else torch.bfloat16
    t0 = time.time()
    model = build_model(dims, device, dtype, seed=0)
    build_s = time.time() - t0
    dense = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if ".blocks." in n}
    generator = torch.Generator().manual_seed(0)
    vocab = dims["vocab_size"]
    windows = torch.randint(0, vocab - 1, (max(a.windows, a.sparsegpt_windows), seqlen), generator=generator)
    windows[windows == MASK_ID % vocab] = 0
    InMemoryDLM.model_in_memory = model
    calibrate("sink_wanda", "cpu", windows[:1], 1, device)  # warm-up: kernels compiled and loaded before anything is timed
    plan = [("sink_wanda resident", "sink_wanda", "none", a.windows, None)] if a.resident else []
    plan += [("sink_wanda cpu", "sink_wanda", "cpu", a.windows, None),
             ("sink_sparsegpt cpu", "sink_sparsegpt", "cpu", a.sparsegpt_windows, None)]
    plan += [("sink_wanda cpu+parked", "sink_wanda", "cpu", a.windows, True)] if a.parked else []
    runs = {}
    for label, method, offload, n, park in plan:
        gc.collect()  # the previous run's trainer and statistics (reference cycles) leave the device first
        if device.type == "cuda":
            torch.cuda.empty_cache()
        restore(model, dense)
        InMemoryDLM.park_inputs = park
        runs[label] = calibrate(method, offload, windows[:n], a.timesteps, device)
    print(f"\n{'run':<22} {'calib. s':>8} {'measured peak':>14} {'predicted':>10} {'meas./pred.':>11}")
    for label, r in runs.items():
        print(f"{label:<22} {r['seconds']:>8.1f} {mp.gib(r['measured_peak_bytes']):>14} {mp.gib(r['predicted_peak_bytes']):>10} "
              f"{r['measured_peak_bytes'] / r['predicted_peak_bytes']:>11.2f}")
    for label, r in runs.items():
        if r["offload"] == "none":
            continue
        phases = r["plan"]["offload_phases"]
        print(f"{label}: " + ", ".join(f"{k} {mp.gib(r['measured_phases'].get(k))} / {mp.gib(v)}" for k, v in phases.items())
              + f" (measured / predicted; block inputs on the {r['offloader']['block_inputs_on']}; weights counted on the"
              f" device: peak {mp.gib(r['offloader']['peak_weight_bytes_on_device'])}, in the block passes"
              f" {mp.gib(r['offloader']['peak_weight_bytes_in_passes'])})")
    extra = {}
    if a.resident:
        res, off = runs["sink_wanda resident"], runs["sink_wanda cpu"]
        extra["time_ratio"] = {k: r["seconds"] / res["seconds"] for k, r in runs.items() if r["method"] == "sink_wanda"}
        extra["masks_identical"] = {k: r["masks"].keys() == res["masks"].keys() and all(
            torch.equal(res["masks"][n], r["masks"][n]) for n in res["masks"]) for k, r in runs.items() if r["method"] == "sink_wanda"}
        print(f"time / resident: {extra['time_ratio']} (target <= 1.5); masks bit-identical to resident: "
              f"{extra['masks_identical']}")
    if device.type == "cpu":
        print("(CPU: counted live bytes; the CPU prefetches no block, so expect about one block below the prediction)")
    import transformers

    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "dtype": str(dtype), "dims": dims, "seqlen": seqlen,
           "timesteps": a.timesteps, "build_s": build_s, **extra,
           "runs": {k: {kk: vv for kk, vv in r.items() if kk != "masks"} for k, r in runs.items()}}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
