"""Prune, then quantize (GPTQ int4 / FP8), saved in the compressed-tensors format with the library itself.

The saved folder reloads through compressed-tensors' own decompression and through transformers' `from_pretrained`
with the in-memory model's exact weights and logits; pruned weights stay exactly zero; bad settings get one line."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from callbacks.quantize import fused_expert_layers
from pipeline.maths import sparsity as sp
from pipeline.maths.gptq import gptq_quantize
from pipeline.maths.quantize import Scheme, dequantize, group_scales, quantize_codes, round_to_nearest
from pipeline.model.calibration import target_linears
from pipeline.model.loading import dlm_forward, load_dlm
from pipeline.run.compressed import save_compressed, tied_twins
from tests.runs import run_cli, run_inprocess, tiny_config

pytest.importorskip("compressed_tensors", reason="the [quantize] extra (in [test]) installs compressed-tensors")
torch.set_num_threads(1)


def _hessians(model, layers, vocab, windows=2, length=24) -> dict:
    """Σ x xᵀ of each layer's inputs over a few random windows of the real model (experts: the tokens routed to them)."""
    sums, handles = {}, []
    for name, layer in layers.items():
        def hook(mod, inp, out, name=name):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
        handles.append(layer.register_forward_hook(hook))
    ids = torch.randint(4, vocab, (windows, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dlm_forward(model, ids)
    for h in handles:
        h.remove()
    return {n: sums.get(n, torch.zeros(layers[n].in_features, layers[n].in_features, dtype=torch.float64)) for n in layers}


def _prune_and_quantize(name: str, scheme: Scheme, gptq: bool = True, dtype: torch.dtype | None = None):
    """The embedded model (in `dtype`, default its own), 50% magnitude-pruned per row, then quantized:
    (model, tokenizer, masks, scales)."""
    model, tokenizer = load_dlm(name, torch_dtype=dtype)
    model.eval()
    layers = target_linears(model)
    hessians = _hessians(model, layers, len(tokenizer)) if gptq else {}
    masks, scales = {}, {}
    with torch.no_grad():
        for n, layer in layers.items():
            masks[n] = sp.select_mask(sp.magnitude_scores(layer.weight.float()), 0.5)
            if gptq:
                new, scales[n], _ = gptq_quantize(layer.weight, hessians[n], scheme, masks[n])
            else:
                scales[n], new = round_to_nearest(layer.weight.masked_fill(masks[n], 0), scheme)
            layer.weight.copy_(new)
    return model, tokenizer, masks, scales


def _on_int4_grid(weight: torch.Tensor, group_size: int) -> bool:
    """Every group of `group_size` inputs is (code in [-8, 7]) × one scale: its largest magnitude is k·scale, k ≤ 8."""
    w = weight.double().reshape(weight.shape[0], -1, group_size)
    absmax = w.abs().amax(-1, keepdim=True)
    on_grid = absmax.squeeze(-1) == 0
    for k in range(1, 9):
        q = w / (absmax / k)
        on_grid |= ((q - q.round()).abs() < 1e-4).all(-1)
    return bool(on_grid.all())


def _logits(model, ids):
    with torch.no_grad():
        return dlm_forward(model, ids).logits


HAS_DIFFUSION_GEMMA = hasattr(transformers, "DiffusionGemmaForBlockDiffusion")
needs_diffusion_gemma = pytest.mark.skipif(not HAS_DIFFUSION_GEMMA,
                                           reason=f"transformers {transformers.__version__} has no DiffusionGemma (tiny-diffgemma)")


@pytest.mark.parametrize("name,scheme,gptq,dtype", [
    pytest.param("tiny-llada", Scheme.parse("w4a16", group_size=64), True, None, marks=pytest.mark.tf5),  # 4.x-era remote code
    pytest.param("tiny-llada-moe", Scheme.parse("w4a16", group_size=32, actorder=True), True, None, marks=pytest.mark.tf5),
    pytest.param("minilm-dlm", Scheme.parse("fp8"), False, None, marks=pytest.mark.tf5),
    # bf16 models: the scales are bf16, the codes times the scale rounded to bf16 once, as the library decompresses
    pytest.param("tiny-llada", Scheme.parse("w4a16", group_size=64), True, torch.bfloat16, marks=pytest.mark.tf5),
    pytest.param("tiny-llada", Scheme.parse("fp8"), False, torch.bfloat16, marks=pytest.mark.tf5),
    # transformers 5's DiffusionGemma: decoder layers tied to the encoder's, fused 3-D MoE experts, LM head tied
    pytest.param("tiny-diffgemma", Scheme.parse("w4a16", group_size=16), True, None, marks=[pytest.mark.tf5, needs_diffusion_gemma]),
    pytest.param("tiny-diffgemma", Scheme.parse("fp8"), False, None, marks=[pytest.mark.tf5, needs_diffusion_gemma]),
])
def test_saved_folder_reloads_with_the_in_memory_weights_and_logits(tmp_path, name, scheme, gptq, dtype):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model, tokenizer, masks, scales = _prune_and_quantize(name, scheme, gptq, dtype)
    if dtype is not None:
        assert all(layer.weight.dtype == dtype and scales[n].dtype == dtype for n, layer in target_linears(model).items())
    layers = target_linears(model)
    fused = set(fused_expert_layers(model, layers))   # quantized in memory, saved dense
    packed = {n: v for n, v in scales.items() if n not in fused}
    twins = tied_twins(model, list(packed))           # tiny-diffgemma's encoder layers: packed too, same scales
    assert bool(fused) == bool(twins) == (name == "tiny-diffgemma")
    ids = torch.randint(4, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(0))
    expected = _logits(model, ids)
    in_memory = {k: v.detach().clone() for k, v in model.named_parameters(remove_duplicate=False)}
    save_compressed(model, tmp_path, packed, scheme)
    tokenizer.save_pretrained(tmp_path)
    assert torch.equal(_logits(model, ids), expected)  # saving leaves the model as it was (tied as it was)
    assert all(model.get_submodule(t).weight is model.get_submodule(n).weight for t, n in twins.items())

    saved_config = json.loads((tmp_path / "config.json").read_text())
    config = saved_config["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == ("float-quantized" if scheme.is_float else "pack-quantized")
    # 1. compressed-tensors' own decompression of the saved tensors gives each layer's weight, bit for bit
    qconfig = QuantizationConfig.model_validate(config)
    group = qconfig.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(qconfig.format)
    saved = load_file(str(tmp_path / "model.safetensors"))
    for n in [*packed, *twins]:
        layer = model.get_submodule(n)
        local = {k[len(n) + 1:]: v for k, v in saved.items() if k.rsplit(".", 1)[0] == n}
        stored = "weight" if scheme.is_float else "weight_packed"
        assert local[stored].dtype == (torch.float8_e4m3fn if scheme.is_float else torch.int32), n
        weight = compressor.decompress(local, group)["weight"]
        assert weight.dtype == layer.weight.dtype and torch.equal(weight, layer.weight), n
        assert not weight[masks[twins.get(n, n)]].any(), n                # pruned weights stay exactly zero
    for n in fused:  # a fused expert's rows in the saved 3-D tensor: its quantized weight, zeros kept
        experts, index, proj = n.rsplit(".", 2)
        row = saved[f"{experts}.{proj}"][int(index)]
        assert torch.equal(row, layers[n].weight) and not row[masks[n]].any(), n
    if twins:  # saved untied: transformers re-ties by name, which a packed layer cannot take
        assert saved_config["tie_word_embeddings"] is False and model.config.tie_word_embeddings is True
    # 2. transformers' compressed-tensors integration: the same logits, and every parameter (encoder's included)
    reloaded, _ = load_dlm(str(tmp_path), torch_dtype="auto")
    assert torch.equal(_logits(reloaded, ids), expected)  # (the first forward decompresses every layer)
    reloaded_params = dict(reloaded.named_parameters(remove_duplicate=False))
    assert in_memory.keys() <= reloaded_params.keys()
    assert all(torch.equal(reloaded_params[k], v) for k, v in in_memory.items())
    if name == "tiny-llada":  # remote-code models keep their code files
        assert (tmp_path / "modeling_llada.py").is_file()


def test_gptq_keeps_zeros_and_beats_round_to_nearest():
    """On a real layer's Hessian: pruned weights exactly zero, every code on the int4 grid, and GPTQ's layer-output
    error below round-to-nearest's (joint with the mask, both joint modes)."""
    model, tokenizer = load_dlm("tiny-llada")
    name, layer = next(iter(target_linears(model).items()))
    h = _hessians(model, {name: layer}, len(tokenizer), windows=4, length=64)[name]
    w = layer.weight.detach()
    mask = sp.select_mask(sp.magnitude_scores(w), 0.5)
    target = w.masked_fill(mask, 0).double()
    scheme = Scheme.parse("w4a16", group_size=64)
    error = lambda q: float(torch.einsum("ij,jk,ik->", q.double() - target, h, q.double() - target))  # noqa: E731
    rtn = error(round_to_nearest(target.float(), scheme)[1])
    for joint in ("obs", "mask"):
        q, scales, info = gptq_quantize(w, h, scheme, mask, joint=joint)
        assert not q[mask].any() and error(q) < 0.9 * rtn, (joint, error(q), rtn)
        codes = quantize_codes(q, scales, scheme)
        assert codes.min() >= -8 and codes.max() <= 7 and torch.equal(dequantize(codes, scales, scheme), q)


def test_grids_map_zero_to_zero():
    w = torch.tensor([[0.0, 1.0, -2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    for scheme in (Scheme.parse("w4a16", group_size=2), Scheme.parse("fp8")):
        scales, q = round_to_nearest(w, scheme)
        assert torch.equal(q == 0, w == 0) and torch.equal(scales, group_scales(w, scheme))


def test_tiny_float16_groups_get_a_usable_scale():
    """float16 weights of 1e-6 (absmax / 448 underflows to 0 in float16): a positive scale, finite codes, zeros kept."""
    w = torch.tensor([[0.0, 1e-6, -2e-6, 0.0], [0.5, 0.0, 0.0, -0.25]], dtype=torch.float16)
    for scheme in (Scheme.parse("w4a16", group_size=2), Scheme.parse("fp8")):
        scales, q = round_to_nearest(w, scheme)
        assert scales.dtype == torch.float16 and bool((scales > 0).all()), scheme
        assert bool(torch.isfinite(q).all()) and not q[w == 0].any() and q[1].count_nonzero() == 2, scheme


@pytest.mark.parametrize("kwargs,message", [
    ({"bits": 3}, r"^quantize bits=3: only 4 .* and 8 .* are supported; use bits: 4 or bits: 8$"),
    ({"scheme": "int3"}, r"^quantize scheme='int3' is unknown; choose one of w4a16, fp8$"),
    ({"group_size": 0}, r"^quantize group_size=0 must be a positive integer"),
    ({"scheme": "fp8", "actorder": True}, r"^quantize actorder=true orders GPTQ's columns; it needs gptq: true"),
])
def test_bad_settings_one_line(kwargs, message):
    from callbacks.quantize import QuantizeCallback

    with pytest.raises(ValueError, match=message):
        QuantizeCallback(**kwargs)


def test_fp8_on_a_torch_without_float8(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match=r"^quantize scheme=fp8: this torch .* has no float8_e4m3fn; install torch >= 2\.1 or use scheme: w4a16$"):
        Scheme.parse("fp8")


@pytest.mark.parametrize("quantize,flags,message", [
    ({"bits": 3}, (), "quantize bits=3: only 4 (int4 GPTQ, scheme w4a16) and 8 (scheme fp8) are supported; use bits: 4 or bits: 8"),
    (None, ("--quantize", "fp8"), "quantize scheme=fp8: this torch {version} has no float8_e4m3fn; install torch >= 2.1 or use scheme: w4a16"),
])
def test_bad_settings_stop_a_run_in_one_line_before_any_work(tmp_path, monkeypatch, quantize, flags, message):
    """bits 3 in a recipe, --quantize fp8 on a torch without float8: one line, exit 2, no model loaded, nothing written."""
    import pipeline.model.module as module

    config = tiny_config(tmp_path / "run", method="wanda", pretrained="tiny-llada", nsamples=2, timesteps=1,
                         prune_args={"tasks": [], "score": False}, model_args={"score_dense": False})
    if quantize is not None:
        config["trainer"]["callbacks"].insert(1, {"class_path": "callbacks.quantize.QuantizeCallback", "init_args": quantize})
    else:
        monkeypatch.delattr(torch, "float8_e4m3fn")
    monkeypatch.setattr(module, "load_dlm", lambda *a, **k: pytest.fail("the model was loaded before the settings were checked"))
    code, err = run_inprocess(config, tmp_path, *flags)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and lines == ["error: " + message.format(version=torch.__version__)], err[-2000:]
    assert not (tmp_path / "run").exists()


def test_group_size_not_dividing_a_width_fails_before_calibration(tmp_path):
    """tiny-llada's 192-wide layers and groups of 128: one line, exit 2, before any calibration or scoring."""
    config = tiny_config(tmp_path / "run", method="wanda", pretrained="tiny-llada", nsamples=2, timesteps=1,
                         prune_args={"tasks": [], "score": False}, model_args={"score_dense": False})
    code, err = run_inprocess(config, tmp_path, "--quantize", "w4a16")
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert "quantize group_size=128: model.transformer.blocks.0.q_proj has 192 inputs, not a multiple of 128; " \
           "choose a group_size dividing every width (e.g. 64) or group_size: null" in lines[0]
    assert not (tmp_path / "run" / "pruned").exists()


def _quantized_run(tmp_path, name, devices, method="sink_wanda", extra=("--quantize", "w4a16", "--group-size", "64")):
    root = tmp_path / name
    trainer = {"devices": devices, **({"strategy": "calibration_ddp_spawn"} if devices > 1 else {})}
    config = tiny_config(root, method=method, nsamples=4, seqlen=32, timesteps=2, trainer_args=trainer, pretrained="tiny-llada",
                         prune_args={"tasks": [], "score": False}, model_args={"score_dense": False})
    proc = run_cli(config, tmp_path, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "pruned"


def test_one_and_two_processes_give_identical_quantized_weights(tmp_path):
    """sink-Wanda 50% + GPTQ int4 (groups of 64) on tiny-llada, gloo: the saved packed weights and scales are identical, pruned
    weights decompress to exactly zero, results.json records the quantization."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    one, two = _quantized_run(tmp_path, "one", 1), _quantized_run(tmp_path, "two", 2)
    w1, w2 = load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys() and sum(k.endswith("weight_packed") for k in w1) == 28
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    results = json.loads((one / "results.json").read_text())
    assert results["quantize"]["scheme"] == "w4a16" and results["quantize"]["algorithm"] == "gptq"
    qconfig = QuantizationConfig.model_validate(json.loads((one / "model" / "config.json").read_text())["quantization_config"])
    masks = load_file(str(one / "masks.safetensors"))
    compressor = BaseCompressor.get_value_from_registry(qconfig.format)
    for n, mask in masks.items():
        local = {k[len(n) + 1:]: v for k, v in w1.items() if k.rsplit(".", 1)[0] == n}
        weight = compressor.decompress(local, qconfig.config_groups["group_0"])["weight"]
        assert not weight[mask.bool()].any() and weight[~mask.bool()].count_nonzero() > 0.9 * (~mask.bool()).sum(), n


@pytest.mark.parametrize("name,group_size,layers,fused,noise", [
    pytest.param("tiny-llada-moe", 32, 56, 0, "mask", marks=pytest.mark.tf5),           # experts as per-expert Linear
    pytest.param("tiny-diffgemma", 16, 29, 16, "uniform", marks=[pytest.mark.tf5, needs_diffusion_gemma]),  # fused 3-D
])
def test_moe_experts_quantized_identically_on_one_and_two_processes(tmp_path, name, group_size, layers, fused, noise):
    """SparseGPT 50% + GPTQ int4 on the MoE models: every expert quantized on its routed tokens, the saved tensors
    identical for 1 and 2 processes, pruned weights zero in the packed layers and in the fused expert tensors (saved
    dense, which one line says at the start), the folder loads.  tiny-diffgemma's decoder is also tied to its encoder.
    One window per batch: an expert's GEMM has as many rows as the batch routes to it, so its outputs' last bits depend
    on the batch's company (tests/test_moe.py), which differs between 1 and 2 processes; alone, the windows compute
    the same bits, and what is left to compare is the cross-rank reduction of the Hessians."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    runs = {}
    for devices in (1, 2):
        root = tmp_path / f"run{devices}"
        trainer = {"devices": devices, **({"strategy": "calibration_ddp_spawn"} if devices > 1 else {})}
        config = tiny_config(root, method="sparsegpt", pretrained=name, nsamples=4, seqlen=32, timesteps=2, batch_size=1,
                             trainer_args=trainer, prune_args={"tasks": [], "score": False},
                             model_args={"score_dense": False, "noise": noise})
        proc = run_cli(config, tmp_path, "--quantize", "w4a16", "--group-size", str(group_size))
        assert proc.returncode == 0, proc.stderr[-3000:]
        notice = [line for line in proc.stderr.splitlines() if "fused MoE expert layers" in line]
        assert notice == ([f"quantize: {fused} fused MoE expert layers are quantized like the others but saved dense (their "
                           "exact quantized values): compressed-tensors packs Linear weights only, and "
                           "DiffusionGemmaForBlockDiffusion loads its experts as fused 3-D tensors"] if fused else []), proc.stderr[-3000:]
        runs[devices] = root / "pruned"
    one, two = (load_file(str(runs[d] / "model" / "model.safetensors")) for d in (1, 2))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    results = json.loads((runs[1] / "results.json").read_text())["quantize"]
    assert results["layers"] == layers and results["saved_dense"] == fused and results["algorithm"] == "gptq"
    qconfig = QuantizationConfig.model_validate(json.loads((runs[1] / "model" / "config.json").read_text())["quantization_config"])
    compressor = BaseCompressor.get_value_from_registry(qconfig.format)
    masks = {n: m.bool() for n, m in load_file(str(runs[1] / "masks.safetensors")).items()}
    saved_dense = 0
    for n, mask in masks.items():
        head, index, proj = n.rsplit(".", 2)
        if f"{head}.{proj}" in one:  # a row of a fused 3-D expert tensor
            weight, saved_dense = one[f"{head}.{proj}"][int(index)], saved_dense + 1
        else:
            local = {k[len(n) + 1:]: v for k, v in one.items() if k.rsplit(".", 1)[0] == n}
            weight = compressor.decompress(local, qconfig.config_groups["group_0"])["weight"]
        assert not weight[mask].any() and weight[~mask].count_nonzero() > 0.9 * (~mask).sum(), n
        assert _on_int4_grid(weight, group_size), n
    assert saved_dense == fused and sum(".experts." in n for n in masks) >= 16
    reloaded, tokenizer = load_dlm(str(runs[1] / "model"), torch_dtype="auto")
    assert torch.isfinite(_logits(reloaded, torch.randint(4, len(tokenizer), (1, 16)))).all()


def test_dense_model_quantized_alone(tmp_path):
    """`--method dense --quantize fp8`: nothing pruned, every targeted layer saved as FP8, whose decompressed weights are
    round-to-nearest of the dense ones; results.json says so."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = tiny_config(tmp_path / "run", method="dense", sparsity=0, pretrained="tiny-llada", nsamples=2, timesteps=1,
                         prune_args={"tasks": [], "score": False}, model_args={"score_dense": False})
    code, err = run_inprocess(config, tmp_path, "--quantize", "fp8")
    assert code == 0, err[-2000:]
    out = tmp_path / "run" / "pruned"
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "dense" and results["quantize"]["scheme"] == "fp8" and results["quantize"]["algorithm"] == "rtn"
    qconfig = QuantizationConfig.model_validate(json.loads((out / "model" / "config.json").read_text())["quantization_config"])
    saved = load_file(str(out / "model" / "model.safetensors"))
    dense, _ = load_dlm("tiny-llada")
    compressor = BaseCompressor.get_value_from_registry(qconfig.format)
    for n, layer in target_linears(dense).items():
        local = {k[len(n) + 1:]: v for k, v in saved.items() if k.rsplit(".", 1)[0] == n}
        assert local["weight"].dtype == torch.float8_e4m3fn, n
        weight = compressor.decompress(local, qconfig.config_groups["group_0"])["weight"]
        assert torch.equal(weight, round_to_nearest(layer.weight.detach(), Scheme.parse("fp8"))[1]), n


def test_console_names_the_quantization_and_its_size(tmp_path):
    """`--quantize w4a16`: the tables read "dense vs pruned + w4a16", and one line names the scheme, the layers, the
    saved size beside the dense one, and the zeros rounding added beyond the masks (why total sparsity exceeds 50%)."""
    root = tmp_path / "run"
    config = tiny_config(root, method="sink_wanda", nsamples=4, seqlen=32, timesteps=2, pretrained="tiny-llada",
                         prune_args={"tasks": []})
    proc = run_cli(config, tmp_path, "--quantize", "w4a16", "--group-size", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = " ".join((proc.stdout + proc.stderr).split())  # rich wraps lines at 80 columns
    assert "dense vs pruned + w4a16 (sink_wanda)" in console
    line = console[console.index("quantized: "):]
    saved = sum(f.stat().st_size for f in (root / "pruned" / "model").glob("*.safetensors"))
    assert line.startswith("quantized: w4a16 GPTQ int4, group 64, 28 layers; saved in compressed-tensors format, "
                           f"{saved / 2**20:.1f} MiB (dense float32 "), line[:300]
    results = json.loads((root / "pruned" / "results.json").read_text())
    masked = sum(int(m.sum()) for m in load_file(str(root / "pruned" / "masks.safetensors")).values())
    layers = results["sparsity_report"]["layers"]
    extra = (sum(r["zeros"] for r in layers) - masked) / sum(r["shape"][0] * r["shape"][1] for r in layers)
    assert extra > 0 and f"; {extra:.2%} of the weights outside the masks round to 0, so the total sparsity " \
                         f"({results['sparsity_report']['total_sparsity']:.2%}) is above the pruned share" in line, line[:300]
