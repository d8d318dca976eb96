"""The DLM families of 2026 at toy size: tiny-dream (Qwen2, bidirectional) and tiny-sdar (Qwen3, block diffusion).

Each twin: blocks found by declared layer class, sink_wanda / sink_sparsegpt at 2:4 end to end, saved with its
remote code, reloaded with trust_remote_code, identical held-out score.  tiny-sdar: the attention probe puts no
mass on keys its block-causal mask hides.
"""
import json
from pathlib import Path

import pytest
import torch

from tests.oracles import probed_forward
from pipeline.model.calibration import find_blocks
from pipeline.model.loading import load_dlm
from tests.runs import run_inprocess, tiny_config
from tests.test_moe import _heldout

pytestmark = pytest.mark.tf5  # also run on transformers 5 (.ci/run)
torch.set_num_threads(1)
LAYERS = ["model.layers.0", "model.layers.1"]
NSAMPLES, SEQLEN, TIMESTEPS = 4, 64, 2
REMOTE_CODE = {"tiny-dream": {"modeling_dream.py", "configuration_dream.py", "twin_layers.py"},
               "tiny-sdar": {"modeling_sdar.py", "configuration_sdar.py", "twin_layers.py"}}


@pytest.fixture(scope="module", params=sorted(REMOTE_CODE))
def twin(request):
    model, tokenizer = load_dlm(request.param)
    return request.param, model, tokenizer


def test_find_blocks_and_layout(twin):
    name, model, _ = twin
    assert [n for n, _ in find_blocks(model)] == LAYERS
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == attn.q_proj.out_features // 2             # GQA
    assert (attn.q_proj.bias is not None) == (name == "tiny-dream")               # Qwen2 biases; Qwen3 none
    assert hasattr(attn, "q_norm") == (name == "tiny-sdar")
    assert model.config.mask_token_id == 2 and "AutoModel" in model.config.auto_map


@pytest.mark.parametrize("name", sorted(REMOTE_CODE))
def test_builder_rebuilds_the_checkpoint_bit_for_bit(tmp_path, name):
    from safetensors.torch import load_file

    from pipeline.model.loading import resolve_path
    from pipeline.zoo.build_tiny_families import build

    build(name, tmp_path / "rebuilt")
    shipped = load_file(str(Path(resolve_path(name)) / "model.safetensors"))
    rebuilt = load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    assert shipped.keys() == rebuilt.keys() and all(torch.equal(shipped[k], rebuilt[k]) for k in shipped)
    assert (Path(resolve_path(name)) / "model.safetensors").stat().st_size < 2 * 2**20


def _visible(length: int, block: int) -> torch.Tensor:
    b = torch.arange(length) // block
    return b[:, None] >= b[None, :]                                               # [query, key]


def test_sdar_block_causal_outputs():
    model, tokenizer = load_dlm("tiny-sdar")
    block = model.config.block_length
    ids = torch.randint(4, len(tokenizer), (1, 4 * block), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 2 * block + 1] = tokenizer.mask_token_id                          # in the third block
    with torch.no_grad():
        moved = (model(input_ids=ids).logits - model(input_ids=changed).logits).abs().amax(-1)[0]
    assert moved[: 2 * block].max() == 0 and moved[2 * block:].min() > 0


def test_sdar_probe_puts_no_mass_on_hidden_keys():
    """Query by query (one-hot query weights), the probed mass on keys in later blocks is exactly zero, and
    every visible key gets some."""
    model, tokenizer = load_dlm("tiny-sdar")
    block, length = model.config.block_length, 3 * model.config.block_length + 5   # a ragged last block
    ids = torch.randint(4, len(tokenizer), (2, length), generator=torch.Generator().manual_seed(1))
    visible = _visible(length, block)
    with torch.no_grad():
        for q in range(length):
            weights = torch.zeros(2, length)
            weights[:, q] = 1.0
            _, probe = probed_forward(model, input_ids=ids, query_weights=weights)
            assert probe.calls == model.config.num_hidden_layers
            assert torch.all(probe.mass[:, ~visible[q]] == 0), q
            assert torch.all(probe.mass[:, visible[q]] > 0), q
            torch.testing.assert_close(probe.mass.sum(-1), torch.full((2,), float(probe.calls * model.config.num_attention_heads)))


def _run(tmp_path, pretrained, **kw):
    root = tmp_path / "run"
    code, err = run_inprocess(tiny_config(root, pretrained=pretrained, nsamples=NSAMPLES, seqlen=SEQLEN,
                                          timesteps=TIMESTEPS, **kw), tmp_path)
    return root, code, err


@pytest.mark.parametrize("pretrained", sorted(REMOTE_CODE))
@pytest.mark.parametrize("method", ["sink_wanda", "sink_sparsegpt"])
def test_prune_2of4_save_reload(tmp_path, pretrained, method):
    root, code, err = _run(tmp_path, pretrained, method=method, n_m="2:4")
    assert code == 0, err[-3000:]
    results = json.loads((root / "pruned" / "results.json").read_text())
    assert results["sparsity_report"]["meets_target"]
    saved = root / "pruned" / "model"
    assert REMOTE_CODE[pretrained] <= {p.name for p in saved.iterdir()}
    reloaded, _ = load_dlm(str(saved))
    w = reloaded.get_parameter("model.layers.1.mlp.down_proj.weight")
    assert torch.all((w.reshape(-1, 4) != 0).sum(-1) <= 2)                       # 2:4 survived the round trip
    assert _heldout(saved) == results["pruned"]["heldout"]


# --- random-token noise (DiffusionGemma-style) -------------------------------------------------------------------
from pipeline.maths.diffusion import forward_process, mask_probability, per_sample_tokens, per_sample_uniform  # noqa: E402
from pipeline.model.calibration import noised_batches  # noqa: E402


@pytest.mark.parametrize("vocab", [7, 4096])
def test_uniform_noise_changes_p_times_one_minus_one_over_v(vocab):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(vocab, (64, 512), generator=g)
    t = 0.6
    noisy, masked, p = forward_process(x0, t, mask_token_id=10**6, noise="uniform", vocab_size=vocab, generator=g)
    p = float(mask_probability(t))
    assert abs(masked.float().mean().item() - p) < 0.01                          # positions noised: p(t)
    changed = (noisy != x0).float().mean().item()
    assert abs(changed - p * (1 - 1 / vocab)) < 0.01                            # a draw may hit the original token
    assert torch.equal(noisy[~masked], x0[~masked]) and noisy.max() < vocab      # never the (absent) mask id
    assert not (noisy != x0)[~masked].any() and ((noisy != x0) <= masked).all()


def test_uniform_noise_is_reproducible_per_sample():
    x0 = torch.randint(100, (3, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x0, "index": torch.tensor([5, 9, 2]), "keep": torch.zeros_like(x0, dtype=torch.bool)}
    runs = [list(noised_batches(batch, [0.3, 0.9], 99, seed=4, noise="uniform", vocab_size=100)) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.masked, b.masked)
    # a sample's noise does not depend on its batch company (DDP-exact): sample 9 alone
    alone = {k: v[1:2] for k, v in batch.items()}
    single = list(noised_batches(alone, [0.3, 0.9], 99, seed=4, noise="uniform", vocab_size=100))
    for a, s in zip(runs[0], single):
        assert torch.equal(a.input_ids[1:2], s.input_ids)
    # the same noised positions as mask noise; only what is written there differs
    masks = list(noised_batches(batch, [0.3, 0.9], 99, seed=4))
    for a, m in zip(runs[0], masks):
        assert torch.equal(a.masked, m.masked) and (m.input_ids[m.masked] == 99).all() and (a.input_ids < 100).all()
    u = per_sample_uniform((3, 32), [1, 2, 3])
    r = per_sample_tokens((3, 32), [1, 2, 3], 100)
    n1, _, _ = forward_process(x0, 0.5, 99, uniform=u, noise="uniform", replacement=r)
    n2, _, _ = forward_process(x0, 0.5, 99, uniform=u, noise="uniform", replacement=per_sample_tokens((3, 32), [1, 2, 3], 100))
    assert torch.equal(n1, n2)


def test_uniform_noise_needs_a_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        forward_process(torch.zeros(1, 4, dtype=torch.long), 0.5, 0, noise="uniform")
    with pytest.raises(ValueError, match="noise='gauss'"):
        forward_process(torch.zeros(1, 4, dtype=torch.long), 0.5, 0, noise="gauss")


def test_module_uniform_noise_end_to_end(tmp_path):
    root, code, err = _run(tmp_path, "tiny-dream", method="sink_wanda", model_args={"noise": "uniform"})
    assert code == 0, err[-3000:]
    results = json.loads((root / "pruned" / "results.json").read_text())
    assert results["sparsity_report"]["meets_target"]


# --- family configs (offline: parsed, never loaded) ----------------------------------------------------------------
import yaml  # noqa: E402

from tests.runs import REPO  # noqa: E402

# recipe -> (model config, twin, real vocabulary size, model_type the twin mirrors, block length or None)
FAMILY_RECIPES = {
    "llada_sink50": ("llada_8b", "tiny-llada", 126464, "llada", None),
    "llada15_sink50": ("llada_1_5", "tiny-llada", 126464, "llada", None),
    "mmada_sink50": ("mmada_8b", "tiny-llada", 126464, "llada", None),
    "llada_moe_sink50": ("llada_moe_7b", "tiny-llada-moe", 157184, "llada_moe", None),
    "llada2_mini_sink50": ("llada2_mini", "tiny-llada-moe", 157184, "llada_moe", 32),
    "dream_sink50": ("dream_7b", "tiny-dream", 152064, "Dream", None),
    "dream_coder_sink50": ("dream_coder_7b", "tiny-dream", 152064, "Dream", None),
    "sdar_sink50": ("sdar_8b", "tiny-sdar", 151936, "sdar", 4),
}
KNOWN_MASK = {"llada_8b": 126336, "llada_1_5": 126336, "mmada_8b": 126336, "llada_moe_7b": 156895,
              "llada2_mini": 156895, "dream_7b": 151666, "dream_coder_7b": 151666, "sdar_8b": 151669}


@pytest.mark.parametrize("recipe", sorted(FAMILY_RECIPES))
def test_family_recipe_parses(tmp_path, recipe, capsys):
    """`cli.py fit --config configs/<recipe>.yaml --print_config` composes model + data + method + evaluate offline."""
    import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", "--config", str(REPO / "configs" / f"{recipe}.yaml"), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]["init_args"]
    config_name, _, _, _, _ = FAMILY_RECIPES[recipe]
    source = yaml.safe_load((REPO / "configs" / "model" / f"{config_name}.yaml").read_text())["init_args"]
    assert model["pretrained"] == source["pretrained"] and model["trust_remote_code"] is True
    callbacks = [c["class_path"] for c in printed["trainer"]["callbacks"]]
    assert callbacks[-1] == "callbacks.evaluate.EvaluateExportCallback" and "callbacks.prune.PruneCallback" in callbacks


@pytest.mark.parametrize("recipe", sorted(FAMILY_RECIPES))
def test_family_structure_matches_twin(recipe):
    """Mask id inside the real vocabulary, the twin mirrors the family (model_type, mask id in its own vocabulary),
    block-diffusion families: the sampler's block length in the recipe, a block-causal mask in the twin."""
    from transformers import AutoConfig

    from pipeline.model.loading import resolve_path

    config_name, twin, vocab, model_type, block = FAMILY_RECIPES[recipe]
    model = yaml.safe_load((REPO / "configs" / "model" / f"{config_name}.yaml").read_text())["init_args"]
    mask = model.get("mask_token_id", KNOWN_MASK[config_name])
    assert mask == KNOWN_MASK[config_name] and 0 <= mask < vocab
    twin_config = AutoConfig.from_pretrained(resolve_path(twin), trust_remote_code=True)
    assert twin_config.model_type == model_type
    twin_vocab = getattr(twin_config, "vocab_size", None) or twin_config.embedding_size
    assert 0 <= twin_config.mask_token_id < twin_vocab
    recipe_yaml = yaml.safe_load((REPO / "configs" / f"{recipe}.yaml").read_text())
    evaluate = yaml.safe_load((REPO / "configs" / recipe_yaml["trainer"]["callbacks"][-1]).read_text())
    lengths = {t.get("block_length") for t in evaluate["init_args"]["tasks"] if "gen_length" in t}
    if block is None:
        assert not getattr(twin_config, "block_causal", False)
    else:
        assert lengths == {block}
        assert twin_config.block_length > 0 and twin_config.block_length < twin_config.max_position_embeddings
        assert model_type != "llada_moe" or hasattr(twin_config, "block_causal")  # LLaDA2: switched on per run
