"""GPTQ int4 of an LLaDA-8B-shaped model on a GPU, timed against the pruning call (sink-Wanda) on the same windows,
then saved in the compressed-tensors format and loaded back on the GPU with transformers, logits compared.

    python benchmarks/quantize_cuda.py                       # H200: 4 blocks of LLaDA-8B (d 4096, 32 heads, MLP 12288,
                                                             # vocab 126464), random bf16 weights built on the GPU
    python benchmarks/quantize_cuda.py --device cpu --tiny   # the same steps at toy size (a check that it runs;
                                                             # --dtype bfloat16 as on the GPU)

The model is tiny-llada's remote code (pipeline/zoo/tiny_llada) at LLaDA-8B's shapes with 4 blocks.  Windows are
random tokens noised at each timestep (the mask token at rate t); sink scores are 1 at position 0, 0 elsewhere (random
weights grow no sinks; the arithmetic is the same).  Both methods take their statistic from the same hooked forwards
(one pass each, timed apart), per sample, rows weighted by 1 − s: sink-Wanda Σ (w x)² per input, GPTQ the Hessian
Σ (w x)(w x)ᵀ (SparseGPT's), one per distinct input (q/k/v and ff_proj/up_proj share theirs).  Then sink-Wanda's masks
(50%), and GPTQ (w4a16, groups of 128) joint with them.  Needs compressed-tensors (and its pydantic, loguru) for the
save and the reload; nothing else beyond torch and transformers.  After the reload it prints what it compared and what
each comparison found, so that a logits difference names its cause: every parameter and buffer bit for bit (dtype
too), the config entries, both models' forwards run twice (the device's own determinism), and the RoPE-style buffers
built on the device against the CPU-built ones the model uses (as every load computes them), with how far the dense
logits move between the two.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.maths import sparsity as sp  # noqa: E402
from pipeline.maths.gptq import gptq_quantize  # noqa: E402
from pipeline.maths.quantize import Scheme  # noqa: E402
from pipeline.model.calibration import target_linears  # noqa: E402
from pipeline.model.loading import ZOO_DIR, dlm_forward, load_dlm, restore_non_persistent_buffers  # noqa: E402

LLADA_8B = {"d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288, "vocab_size": 126464,
            "embedding_size": 126464, "n_layers": 4, "max_sequence_length": 4096}
TINY = {"d_model": 256, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 512, "vocab_size": 4096,
        "embedding_size": 4096, "n_layers": 2, "max_sequence_length": 512}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(shape: dict, device, dtype, probe_vocab: int):
    """(model, buffer report).  Non-persistent buffers (RoPE's inv_freq) end computed on the CPU, as every load
    computes them (the reload below too): built on the GPU they may differ in the last bit (CUDA's pow is not
    correctly rounded).  The report says, per buffer, how far the device-built one was from the CPU-built one, and how
    far the dense model's logits move between the two (what a reload would see if that were the only difference)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(ZOO_DIR / "tiny_llada", trust_remote_code=True)
    for k, v in shape.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(config, trust_remote_code=True, torch_dtype=dtype)
    model.eval()
    with torch.no_grad():  # random weights at LLaDA's scale
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    on_device = {n: b.clone() for n, b in model.named_buffers()}
    probe = torch.randint(4, probe_vocab, (1, 64), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        logits_device_buffers = dlm_forward(model, probe).logits.float()
    restored = restore_non_persistent_buffers(model)
    with torch.no_grad():
        logits_cpu_buffers = dlm_forward(model, probe).logits.float()
    report = {"buffers": [tensor_difference(n, on_device[n], model.get_buffer(n)) for n in restored],
              "dense_logits_max_abs_diff_device_vs_cpu_buffers": float((logits_device_buffers - logits_cpu_buffers).abs().max())}
    return model, report


def tensor_difference(name: str, mine: torch.Tensor, theirs: torch.Tensor | None) -> dict:
    """What one comparison found: dtypes, devices, whether equal, the largest difference and how many elements differ."""
    if theirs is None:
        return {"name": name, "equal": False, "missing": True}
    row = {"name": name, "dtype": f"{mine.dtype} / {theirs.dtype}", "device": f"{mine.device} / {theirs.device}",
           "shape_equal": tuple(mine.shape) == tuple(theirs.shape)}
    if not row["shape_equal"]:
        return {**row, "equal": False}
    a, b = mine.detach().float(), theirs.detach().to(mine.device).float()  # (on the device: no 2 GB copies to the host)
    differ = a != b
    return {**row, "equal": mine.dtype == theirs.dtype and not bool(differ.any()),
            "max_abs_diff": float((a - b).abs().max()) if a.numel() else 0.0, "elements_differ": int(differ.sum())}


def config_differences(mine, theirs) -> dict:
    """Config entries that differ between the in-memory model and the reloaded one (quantization and paths aside)."""
    skip = {"quantization_config", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}
    a, b = mine.config.to_dict(), theirs.config.to_dict()
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in skip and a.get(k) != b.get(k)}


def shared_inputs(model, layers: dict, ids) -> dict[str, str]:
    """layer -> the first layer that reads the very same input tensor (q/k/v, ff_proj/up_proj)."""
    seen, leader = {}, {}
    def note(name, x) -> None:  # inputs held, so no later tensor reuses their memory (a hook must return None)
        seen.setdefault(name, (x, (x.data_ptr(), tuple(x.shape), x.stride())))

    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: note(n, inp[0])) for n, m in layers.items()]
    with torch.no_grad():
        dlm_forward(model, ids[:1, :8])
    for h in handles:
        h.remove()
    first = {}
    for n in layers:
        leader[n] = first.setdefault(seen[n][1], n)
    return leader


def statistic_pass(model, layers, leaders, batches, add) -> float:
    """One hooked forward per noised window; add(name, x [T, d], w [T]) for each distinct input. Seconds."""
    def hook(name, x) -> None:
        add(name, x[0].detach(), weights)

    handles = [layers[n].register_forward_hook(lambda mod, inp, out, n=n: hook(n, inp[0])) for n in layers if leaders[n] == n]
    device = next(model.parameters()).device
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids, weights in batches:
            dlm_forward(model, ids)
    sync(device)
    for h in handles:
        h.remove()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (a CPU check)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--timesteps", type=int, default=2)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "quantize_cuda.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = TINY if args.tiny else LLADA_8B
    if args.tiny:
        args.windows, args.seqlen = min(args.windows, 2), min(args.seqlen, 64)

    t0 = time.perf_counter()
    model, buffer_report = build(shape, device, dtype, shape["vocab_size"])
    layers = target_linears(model)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    batches = []
    for t in [(k + 1) / args.timesteps for k in range(args.timesteps)]:
        for _ in range(args.windows):
            ids = torch.randint(4, shape["vocab_size"], (1, args.seqlen), generator=gen)
            ids[torch.rand(ids.shape, generator=gen) < t] = model.config.mask_token_id
            sink = torch.zeros(args.seqlen)
            sink[0] = 1.0
            batches.append((ids.to(device), (1.0 - sink).to(device)))
    leaders = shared_inputs(model, layers, batches[0][0])

    # the forward alone (what both passes share)
    forward_s = statistic_pass(model, layers, {n: None for n in layers}, batches, None)
    wanda: dict[str, torch.Tensor] = {}
    wanda_s = statistic_pass(model, layers, leaders, batches, lambda n, x, w: wanda.__setitem__(
        n, wanda.get(n, 0) + sp.sample_act_sq_sums(x[None], w[None])[0]))
    hessians: dict[str, torch.Tensor] = {}

    def add_hessian(n, x, w):
        if n not in hessians:
            hessians[n] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
        sp.add_sample_hessian_(hessians[n], x, w)
    hessian_s = statistic_pass(model, layers, leaders, batches, add_hessian)

    sync(device)
    t0 = time.perf_counter()
    masks = {}
    with torch.no_grad():
        for n, layer in layers.items():
            masks[n] = sp.select_mask(sp.wanda_scores(layer.weight.float(), wanda[leaders[n]]), 0.5)
            sp.apply_mask_(layer.weight, masks[n])
    sync(device)
    prune_solve_s = time.perf_counter() - t0

    scheme = Scheme.parse("w4a16", group_size=128)
    t0 = time.perf_counter()
    scales, per_layer = {}, {}
    with torch.no_grad():
        for n, layer in layers.items():
            s0 = time.perf_counter()
            new, scales[n], _ = gptq_quantize(layer.weight, hessians[leaders[n]].double(), scheme, masks[n])
            layer.weight.copy_(new)
            sync(device)
            per_layer[n.rsplit(".", 1)[-1]] = per_layer.get(n.rsplit(".", 1)[-1], 0.0) + time.perf_counter() - s0
    sync(device)
    gptq_s = time.perf_counter() - t0
    zeros_kept = all(not layers[n].weight[masks[n]].any() for n in layers)

    probe = batches[0][0]
    with torch.no_grad():
        expected = dlm_forward(model, probe).logits.float()
        repeatable = bool(torch.equal(dlm_forward(model, probe).logits.float(), expected))  # the device's own determinism
    from transformers import AutoTokenizer

    from pipeline.run.compressed import save_compressed

    folder = Path(tempfile.mkdtemp(prefix="quantize_cuda-"))
    try:
        t0 = time.perf_counter()
        save_compressed(model, folder, scales, scheme)
        AutoTokenizer.from_pretrained(ZOO_DIR / "tiny_llada").save_pretrained(folder)
        save_s = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        t0 = time.perf_counter()
        reloaded, _ = load_dlm(str(folder), torch_dtype="auto")  # (no device_map: it may want accelerate)
        reloaded.to(device)  # still packed: compressed-tensors decompresses on the first forward, on the device
        with torch.no_grad():
            got = dlm_forward(reloaded, probe).logits.float()
        load_s = time.perf_counter() - t0
        with torch.no_grad():
            reloaded_repeatable = bool(torch.equal(dlm_forward(reloaded, probe).logits.float(), got))
        state = lambda m: dict(m.named_parameters()) | dict(m.named_buffers())  # noqa: E731
        mine, theirs = state(model), state(reloaded)
        compared = [tensor_difference(n, t, theirs.get(n)) for n, t in mine.items()]
        configs_differ = config_differences(model, reloaded)
        modes_differ = [n for n, m in reloaded.named_modules() if m.training]
        del reloaded
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    tensors_differ = [c for c in compared if not c["equal"]]
    where = (got - expected).abs().flatten().argmax().item()
    logits = {"equal": bool(torch.equal(got, expected)), "max_abs_diff": float((got - expected).abs().max()),
              "at_position_token": [where // got.shape[-1] % got.shape[-2], where % got.shape[-1]],
              "in_memory_repeatable": repeatable, "reloaded_repeatable": reloaded_repeatable}

    dense_bytes = sum(l.weight.numel() * 2 for l in layers.values())
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "shape": shape,
        "windows": args.windows, "seqlen": args.seqlen, "timesteps": args.timesteps, "dtype": str(dtype),
        "torch": torch.__version__, "build_s": build_s, "forward_s": forward_s,
        "sink_wanda": {"statistic_pass_s": wanda_s, "solve_s": prune_solve_s, "total_s": wanda_s + prune_solve_s},
        "gptq_w4": {"hessian_pass_s": hessian_s, "solve_s": gptq_s, "total_s": hessian_s + gptq_s,
                    "solve_s_by_layer_kind": per_layer},
        "gptq_vs_prune": (hessian_s + gptq_s) / (wanda_s + prune_solve_s),
        "zeros_kept": zeros_kept, "save_s": save_s, "reload_and_forward_s": load_s, "safetensors_bytes": disk,
        "targeted_bf16_bytes": dense_bytes,
        "logits_equal": logits["equal"], "logits_max_abs_diff": logits["max_abs_diff"], "logits": logits,
        "forward_repeatable": repeatable,
        "tensors_compared": len(compared), "tensors_equal_after_reload": not tensors_differ,
        "tensors_differ": tensors_differ[:16], "config_differs": {k: list(map(str, v)) for k, v in configs_differ.items()},
        "reloaded_modules_in_training_mode": modes_differ[:8], "buffers_device_vs_cpu": buffer_report,
    }
    print(f"{'step':36s} {'seconds':>9s}")
    for label, value in (("forward alone (all windows)", forward_s), ("sink-Wanda statistic pass", wanda_s),
                         ("sink-Wanda masks (50%)", prune_solve_s), ("GPTQ Hessian pass", hessian_s),
                         ("GPTQ w4a16 solve (joint with masks)", gptq_s), ("save (compressed-tensors)", save_s),
                         ("reload on device + forward", load_s)):
        print(f"{label:36s} {value:9.2f}")
    print(f"GPTQ / sink-Wanda time: {result['gptq_vs_prune']:.1f}x; zeros kept: {zeros_kept}; "
          f"safetensors {disk / 2**30:.2f} GiB")
    print_comparison(result)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


def print_comparison(result: dict) -> None:
    """What was compared after the reload, and what each comparison found (the bf16 logits difference's suspects)."""
    logits, buffers = result["logits"], result["buffers_device_vs_cpu"]
    print("\nreload comparison (in-memory quantized model vs the saved folder loaded back on the device):")
    print(f"  logits: equal {logits['equal']}, max |diff| {logits['max_abs_diff']:.3g} at (position, token) "
          f"{logits['at_position_token']}; each model's forward run twice gives the same logits: in-memory "
          f"{logits['in_memory_repeatable']}, reloaded {logits['reloaded_repeatable']}")
    print(f"  parameters and buffers compared: {result['tensors_compared']}, all bit-equal (dtype too): "
          f"{result['tensors_equal_after_reload']}")
    for row in result["tensors_differ"]:
        print(f"    differs: {row['name']} dtype {row.get('dtype')} device {row.get('device')} "
              f"max |diff| {row.get('max_abs_diff')} elements {row.get('elements_differ')}"
              f"{' (missing from the reload)' if row.get('missing') else ''}")
    print(f"  config entries that differ: {result['config_differs'] or 'none'}; reloaded modules in training mode: "
          f"{result['reloaded_modules_in_training_mode'] or 'none'}")
    print(f"  RoPE-style buffers built on the device vs on the CPU (the model uses the CPU's, as a load does): "
          f"dense logits move by {buffers['dense_logits_max_abs_diff_device_vs_cpu_buffers']:.3g} between the two")
    for row in buffers["buffers"]:
        print(f"    {row['name']} dtype {row.get('dtype')}: equal {row['equal']}, max |diff| {row.get('max_abs_diff')}, "
              f"{row.get('elements_differ')} elements differ")
    if not logits["equal"]:
        suspects = ("the reload's tensors" if result["tensors_differ"] else None,
                    "the config" if result["config_differs"] else None,
                    "device nondeterminism" if not (logits["in_memory_repeatable"] and logits["reloaded_repeatable"]) else None)
        print(f"  logits differ; suspects left: {', '.join(s for s in suspects if s) or 'none of these (weights, buffers, config and the forward all match: look at the kernels each model dispatches)'}")


if __name__ == "__main__":
    main()
