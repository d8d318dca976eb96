"""tiny-diffgemma: transformers 5's own DiffusionGemma at toy size (random init), with random-token noise.

No remote code: `DiffusionGemmaForBlockDiffusion`, attention through `ALL_ATTENTION_FUNCTIONS`.  A window is the
decoder's canvas behind an empty prompt (`loading.dlm_forward`); the pruned layers are the decoder's, tied to the
encoder's.  Skipped where transformers has no DiffusionGemma (4.x); CI runs it in the `-m tf5` subset.
"""
import json
from pathlib import Path

import pytest
import torch
import transformers

from pipeline.maths.attention import AttentionMassProbe
from pipeline.model.calibration import find_blocks
from pipeline.model.loading import dlm_forward, empty_prompt_cache, load_dlm, resolve_path
from tests.runs import run_inprocess, tiny_config

HAS_DIFFUSION_GEMMA = hasattr(transformers, "DiffusionGemmaForBlockDiffusion")
pytestmark = pytest.mark.tf5
needs_it = pytest.mark.skipif(not HAS_DIFFUSION_GEMMA,
                              reason=f"transformers {transformers.__version__} has no DiffusionGemma")
torch.set_num_threads(1)
NAME = "tiny-diffgemma"
DECODER_LAYERS = ["model.decoder.layers.0", "model.decoder.layers.1"]
NSAMPLES, SEQLEN, TIMESTEPS = 4, 64, 2


@pytest.mark.skipif(HAS_DIFFUSION_GEMMA, reason="this transformers has DiffusionGemma")
def test_without_diffusion_gemma_one_line_error():
    with pytest.raises(ValueError, match=r"model_type 'diffusion_gemma' is not in transformers .*transformers>=5\.24"):
        load_dlm(NAME)


@pytest.fixture(scope="module")
def native():
    return load_dlm(NAME)


@needs_it
def test_native_class_no_remote_code(native):
    model, tokenizer = native
    assert type(model) is transformers.DiffusionGemmaForBlockDiffusion
    assert type(model).__module__.startswith("transformers.models")
    assert not getattr(model.config, "auto_map", None) and model.config._attn_implementation == "sdpa"
    assert [n for n, _ in find_blocks(model)] == DECODER_LAYERS                  # the decoder's, never the encoder's
    enc = model.model.encoder.language_model.layers[1].mlp.down_proj.weight
    assert enc is model.get_parameter(f"{DECODER_LAYERS[1]}.mlp.down_proj.weight")  # tied: pruning one prunes both
    assert (Path(resolve_path(NAME)) / "model.safetensors").stat().st_size < 1 << 20
    assert "random" in (Path(resolve_path(NAME)) / "README.md").read_text().lower()


@needs_it
def test_window_forward_is_bidirectional_and_deterministic(native):
    model, tokenizer = native
    ids = torch.randint(4, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 20] = 5
    with torch.no_grad():
        a, b, c = (dlm_forward(model, x).logits for x in (ids, ids, changed))
    assert a.shape == (2, 24, model.config.get_text_config().vocab_size)
    assert torch.equal(a, b)                                                     # no random canvas drawn
    assert (a - c).abs().amax(-1)[:, :20].min() > 0                              # a later token moves earlier logits


@needs_it
def test_benchmark_logits_go_through_the_canvas(native):
    """lm-eval scoring and sampling (guided_logits) denoise the window as the decoder's canvas, like calibration."""
    from pipeline.evaluation.sampler import guided_logits

    model, tokenizer = native
    ids = torch.randint(4, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(1))
    prompt = torch.zeros(16, dtype=torch.bool)
    prompt[:4] = True
    with torch.no_grad():
        plain, again = (guided_logits(model, ids, prompt, 3) for _ in range(2))
        guided = guided_logits(model, ids, prompt, 3, cfg=1.0)
        canvas = dlm_forward(model, ids).logits
    assert torch.equal(plain, canvas) and torch.equal(plain, again)
    assert guided.shape == canvas.shape and not torch.equal(guided, canvas)


@needs_it
def test_probe_mass_equals_eager_attention(native):
    """The probe (patched SDPA under `ALL_ATTENTION_FUNCTIONS["sdpa"]`) gives, per layer, the mass that
    transformers' own eager attention probabilities give summed over heads and queries."""
    model, tokenizer = native
    eager, _ = load_dlm(NAME, attn_implementation="eager")
    ids = torch.randint(4, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), AttentionMassProbe(per_layer=True) as probe:
        dlm_forward(model, ids)
    with torch.no_grad():
        out = eager(decoder_input_ids=ids, cache=empty_prompt_cache(eager, 2), output_attentions=True)
    assert probe.calls == len(out.attentions) == 2
    for mine, probs in zip(probe.per_layer, out.attentions):
        torch.testing.assert_close(mine, probs.float().sum(dim=(1, 2)), rtol=1e-5, atol=1e-5)
    heads = model.config.get_text_config().num_attention_heads
    torch.testing.assert_close(probe.mass.sum(-1), torch.full((2,), 2.0 * heads * 40))


@needs_it
def test_fused_experts_unfused_bit_identical(native):
    """load_dlm turns the fused 3-D experts into per-expert Linears: same logits as the unmodified class (its default
    and eager experts implementations), same state-dict keys, shapes and values; encoder and decoder share them."""
    from pipeline.model.fused_experts import UnfusedExperts

    model, tokenizer = native
    experts = model.get_submodule(f"{DECODER_LAYERS[0]}.experts")
    assert isinstance(experts, UnfusedExperts) and len(experts) == 4
    assert experts is model.model.encoder.language_model.layers[0].experts
    assert isinstance(experts[3].down_proj, torch.nn.Linear) and experts[3].down_proj.weight.shape == (32, 16)
    ids = torch.randint(4, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mine = dlm_forward(model, ids).logits
        for implementation in ("grouped_mm", "eager"):
            fused = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(
                resolve_path(NAME), experts_implementation=implementation).eval()
            assert torch.equal(dlm_forward(fused, ids).logits, mine), implementation
    ours, theirs = model.state_dict(), fused.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def _assert_experts_2of4(reloaded) -> None:
    """Every expert's gate_up / down weight 2:4 along its inputs, on the native class's fused 3-D parameters."""
    for prefix in (*DECODER_LAYERS, "model.encoder.language_model.layers.0"):
        for proj in ("gate_up_proj", "down_proj"):
            w = reloaded.get_parameter(f"{prefix}.experts.{proj}")
            assert w.dim() == 3 and w.shape[0] == 4
            assert torch.all((w.reshape(-1, 4) != 0).sum(-1) <= 2), f"{prefix}.experts.{proj}"
            assert (w != 0).float().mean() == 0.5                                 # pruned, not zeroed


@needs_it
def test_builder_rebuilds_the_checkpoint_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    from pipeline.zoo.build_tiny_native import build

    build(tmp_path / "rebuilt")
    shipped = load_file(str(Path(resolve_path(NAME)) / "model.safetensors"))
    rebuilt = load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    assert shipped.keys() == rebuilt.keys() and all(torch.equal(shipped[k], rebuilt[k]) for k in shipped)


def _heldout_uniform(saved) -> dict:
    from lightning import Trainer

    from callbacks.evaluate import EvaluateExportCallback
    from pipeline.model.data import CalibrationData
    from pipeline.model.module import DLMModule

    module = DLMModule(pretrained=str(saved), heldout_timesteps=2, noise="uniform")
    evaluate = EvaluateExportCallback()
    dm = CalibrationData(tokenizer=str(saved), nsamples=NSAMPLES, seqlen=SEQLEN, batch_size=2, heldout_samples=4)
    Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[evaluate]).fit(module, datamodule=dm)
    return evaluate.dense["heldout"]


@needs_it
@pytest.mark.parametrize("method", ["sink_wanda", "sink_sparsegpt"])
def test_prune_2of4_uniform_noise_save_reload(tmp_path, method):
    root = tmp_path / "run"
    config = tiny_config(root, pretrained=NAME, method=method, n_m="2:4", nsamples=NSAMPLES, seqlen=SEQLEN,
                         timesteps=TIMESTEPS, model_args={"noise": "uniform", "trust_remote_code": False},
                         prune_args={"ignore": [r"\.router\."]})
    code, err = run_inprocess(config, tmp_path)
    assert code == 0, err[-3000:]
    results = json.loads((root / "pruned" / "results.json").read_text())
    assert results["sparsity_report"]["meets_target"]
    assert {layer["layer"].rsplit(".", 1)[0] for layer in results["sparsity_report"]["layers"]} >= {
        f"{DECODER_LAYERS[1]}.self_attn", f"{DECODER_LAYERS[1]}.mlp"}
    assert all(layer["layer"].startswith("model.decoder.layers.") for layer in results["sparsity_report"]["layers"])
    pruned = {layer["layer"] for layer in results["sparsity_report"]["layers"]}
    projections = ("gate_up_proj", "down_proj")
    assert {f"{p}.experts.{e}.{proj}" for p in DECODER_LAYERS for e in range(4) for proj in projections} <= pruned
    tokens = results["moe"]["expert_tokens"]                                      # per expert, routed tokens seen
    assert sorted(tokens) == sorted(f"{p}.experts.{e}" for p in DECODER_LAYERS for e in range(4))
    assert all(n > 0 for n in tokens.values()) and sum(tokens.values()) == 2 * 2 * NSAMPLES * SEQLEN * TIMESTEPS
    assert results["moe"]["dense_routers"] == [f"{p}.router.proj" for p in DECODER_LAYERS]  # found beside the experts
    assert results["pruned"]["heldout"]["tokens"] > 0 and results["pruned"]["heldout"]["nll"] > 0
    saved = root / "pruned" / "model"
    assert not list(saved.glob("*.py"))                                          # native: nothing to trust
    native, info = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    from safetensors.torch import load_file
    shipped = load_file(str(Path(resolve_path(NAME)) / "model.safetensors"))
    written = load_file(str(saved / "model.safetensors"))                         # the original fused layout
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in shipped.items()}
    _assert_experts_2of4(native)
    reloaded, _ = load_dlm(str(saved), trust_remote_code=False)
    for prefix in (DECODER_LAYERS[1], "model.encoder.language_model.layers.1"):  # tied weights stay pruned
        w = reloaded.get_parameter(f"{prefix}.mlp.down_proj.weight")
        assert torch.all((w.reshape(-1, 4) != 0).sum(-1) <= 2), prefix
    router = reloaded.get_parameter(f"{DECODER_LAYERS[0]}.router.proj.weight")
    assert (router != 0).all()                                                   # ignored: dense
    assert _heldout_uniform(saved) == results["pruned"]["heldout"]


def test_recipe_parses_with_uniform_noise_and_dense_routers(capsys):
    """configs/tiny_diffgemma_sink_2of4.yaml composes offline (no model is loaded: any transformers)."""
    import yaml

    import cli
    from tests.runs import REPO

    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", "--config", str(REPO / "configs" / "tiny_diffgemma_sink_2of4.yaml"), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]["init_args"]
    assert model["pretrained"] == NAME and model["noise"] == "uniform" and model["trust_remote_code"] is False
    callbacks = printed["trainer"]["callbacks"]
    prune = next(c["init_args"] for c in callbacks if c["class_path"] == "callbacks.prune.PruneCallback")
    assert prune["n_m"] == "2:4" and prune["ignore"] == [r"\.router\."] and prune["method"] == "sink_wanda"
