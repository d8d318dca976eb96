"""Mixture-of-experts models: block detection, routed-token statistics, end-to-end pruning of tiny-llada-moe."""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.model.calibration import NoisedBatch, find_blocks
from callbacks.layers import accumulate
from callbacks.prune import PruneCallback
from pipeline.model.loading import load_dlm, resolve_path
from tests.runs import run_inprocess, tiny_config

torch.set_num_threads(1)
LAYERS = ["model.layers.0", "model.layers.1"]
NSAMPLES, SEQLEN, TIMESTEPS = 4, 64, 2


@pytest.fixture(scope="module")
def moe():
    return load_dlm("tiny-llada-moe")


def test_find_blocks_picks_layers_not_experts(moe):
    model, _ = moe
    assert len(model.model.layers[0].mlp.experts) > len(model.model.layers)  # the case the old rule got wrong
    assert [n for n, _ in find_blocks(model)] == LAYERS  # declared layer class (_no_split_modules)
    model._no_split_modules = []  # structure alone: the outermost list, never a block's experts
    try:
        assert [n for n, _ in find_blocks(model)] == LAYERS
    finally:
        del model._no_split_modules


def test_block_causal_mask(moe):
    model, tokenizer = moe
    model.config.block_causal = True
    try:
        ids = torch.randint(4, len(tokenizer), (1, 70), generator=torch.Generator().manual_seed(0))
        changed = ids.clone()
        changed[0, 40] = tokenizer.mask_token_id  # in the second block of 32
        with torch.no_grad():
            moved = (model(input_ids=ids).logits - model(input_ids=changed).logits).abs().amax(-1)[0]
        assert moved[:32].max() == 0 and moved[32:].min() > 0  # earlier blocks never see later ones
    finally:
        model.config.block_causal = False


@pytest.mark.parametrize("method", ["sink_wanda", "sink_sparsegpt"])
def test_expert_statistics_weight_each_routed_token(moe, method):
    """An expert's statistic is Σ over the tokens routed to it of (w_t x_t)², w_t that token's own weight."""
    model, tokenizer = moe
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tokenizer), (2, 16), generator=g)
    nb = NoisedBatch(ids, ids, torch.zeros_like(ids, dtype=torch.bool), 0.5, 0, [0, 1], sink_scores=torch.rand(2, 16, generator=g))
    cb = PruneCallback(method=method)
    module = SimpleNamespace(model=model, mask_token_id=model.config.mask_token_id)  # the callbacks' protocol
    cb.on_fit_start(None, module)
    assert "model.layers.0.mlp.gate" not in cb.layers and cb.t.dense_routers == [f"{n}.mlp.gate" for n in LAYERS]
    expert = model.model.layers[1].mlp.experts[4]
    seen = []
    handle = expert.down_proj.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), expert.routed_tokens.clone())))
    try:
        cb._forward_and_accumulate(None, module, nb, list(cb.layers), [True, True])
    finally:
        handle.remove()
    (x, tokens), = seen
    w = (1 - nb.sink_scores).flatten()[tokens]                  # [n_routed]
    y = x.double() * w.double()[:, None]
    name = "model.layers.1.mlp.experts.4.down_proj"
    expected = y.T @ y if method == "sink_sparsegpt" else (y * y).sum(0)
    torch.testing.assert_close(cb.sums.total(name), expected, rtol=1e-5, atol=1e-9)
    assert cb.sums.total(f"{name}#tokens").item() == len(tokens)


def _run(tmp_path, pretrained="tiny-llada-moe", **kw):
    root = tmp_path / "run"
    code, err = run_inprocess(tiny_config(root, pretrained=pretrained, nsamples=NSAMPLES, seqlen=SEQLEN,
                                          timesteps=TIMESTEPS, **kw), tmp_path)
    return root, code, err


def _heldout(saved):
    from lightning import Trainer

    from pipeline.model.data import CalibrationData
    from callbacks.evaluate import EvaluateExportCallback
    from pipeline.model.module import DLMModule

    module = DLMModule(pretrained=str(saved), heldout_timesteps=2)

    evaluate = EvaluateExportCallback()
    dm = CalibrationData(tokenizer=str(saved), nsamples=NSAMPLES, seqlen=SEQLEN, batch_size=2, heldout_samples=4)
    Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[evaluate]).fit(module, datamodule=dm)
    return evaluate.dense["heldout"]


@pytest.mark.parametrize("method,n_m,mode", [("sink_wanda", None, "oneshot"), ("sink_sparsegpt", "2:4", "sequential")])
def test_prune_save_reload(tmp_path, moe, method, n_m, mode):
    root, code, err = _run(tmp_path, method=method, n_m=n_m, prune_args={"mode": mode})
    assert code == 0, err[-3000:]
    results = json.loads((root / "pruned" / "results.json").read_text())
    assert results["sparsity_report"]["meets_target"]
    saved = root / "pruned" / "model"
    assert {"modeling_llada_moe.py", "configuration_llada_moe.py", "twin_layers.py"} <= {p.name for p in saved.iterdir()}
    # every expert Linear pruned, routers dense and unchanged
    masks = load_file(str(root / "pruned" / "masks.safetensors"))
    assert sum(".experts." in k for k in masks) == 2 * 8 * 3 and not any(k.endswith(".gate") for k in masks)
    reloaded, _ = load_dlm(str(saved))
    for layer in LAYERS:
        gate = f"{layer}.mlp.gate.weight"
        assert torch.equal(reloaded.get_parameter(gate), moe[0].get_parameter(gate))
    # tokens routed per layer = noised tokens x top_k
    counts = results["moe"]["expert_tokens"]
    top_k = reloaded.config.num_experts_per_tok
    for layer in LAYERS:
        per_layer = [v for k, v in counts.items() if k.startswith(f"{layer}.mlp.experts.")]
        assert len(per_layer) == 8 and sum(per_layer) == NSAMPLES * SEQLEN * TIMESTEPS * top_k
    assert _heldout(saved) == results["pruned"]["heldout"]


def test_expert_without_tokens_stops_the_run(tmp_path):
    """A router that never picks an expert: one line naming it, nothing written."""
    folder = tmp_path / "never"
    shutil.copytree(resolve_path("tiny-llada-moe"), folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.1.mlp.expert_bias"][5] = -1e4  # selection bias: expert 5 is never in the top-2
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    root, code, err = _run(tmp_path, method="wanda", pretrained=str(folder))
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: prune: MoE expert model.layers.1.mlp.experts.5 saw no calibration tokens")
    assert f"data.nsamples >= {3 * NSAMPLES}" in line
    assert not (root / "pruned").exists()


@pytest.mark.parametrize("method", ["sink_wanda", "sink_sparsegpt"])
def test_expert_statistics_do_not_depend_on_batch_company(moe, method):
    """Per-sample sums (what keeps DDP reductions exact): given the same routed rows, a sample adds the same
    bits alone or in a batch.  (The MoE forward itself is not batch-invariant to the last bit: an expert's
    GEMM has as many rows as tokens routed to it, which depends on the batch.)"""
    model, _ = moe
    name = "model.layers.0.mlp.experts.2.up_proj"
    g = torch.Generator().manual_seed(1)
    seqlen, scores = 8, torch.rand(2, 8, generator=g)
    tokens = [torch.tensor([0, 3, 4, 7]), torch.tensor([1, 2, 6])]             # each sample's routed positions
    rows = [torch.randn(len(t), 64, generator=g) for t in tokens]

    def nb(samples):
        ids = torch.zeros(len(samples), seqlen, dtype=torch.long)
        return NoisedBatch(ids, ids, ids.bool(), 0.5, 0, samples, sink_scores=scores[samples])

    def stats(together: bool):
        cb = PruneCallback(method=method, reduction_slots=1)
        cb.on_fit_start(None, SimpleNamespace(model=model, mask_token_id=model.config.mask_token_id))
        if together:  # flat indices into the [2·L] batch, ascending
            accumulate(cb.pruner, cb.sums, name, torch.cat(rows), torch.cat([tokens[0], tokens[1] + seqlen]), nb([0, 1]), [True, True])
        else:
            for b in (0, 1):
                accumulate(cb.pruner, cb.sums, name, rows[b], tokens[b], nb([b]), [True])
        return cb.sums.total(name), cb.sums.total(f"{name}#tokens")

    (together, n_together), (apart, n_apart) = stats(True), stats(False)
    assert torch.equal(together, apart) and n_together.item() == n_apart.item() == 7


def test_single_pass_matches_two_pass(tmp_path):
    masks = []
    for single in (False, True):
        (tmp_path / str(single)).mkdir()
        root, code, err = _run(tmp_path / str(single), method="sink_wanda", prune_args={"single_pass": single})
        assert code == 0, err[-3000:]
        masks.append(load_file(str(root / "pruned" / "masks.safetensors")))
    assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_two_processes_count_the_same_tokens(tmp_path):
    """calibration_ddp on 2 processes: the per-expert counts are reduced across ranks like the statistics.

    Masks are compared with a tolerance of 0.1%: unlike a dense model, an MoE forward is not bit-invariant to
    the batch's company (each expert's GEMM has as many rows as tokens routed to it), so near-ties may flip."""
    from tests.runs import run_cli

    runs = []
    for devices in (1, 2):
        root = tmp_path / f"d{devices}"
        trainer = {"devices": devices, **({"strategy": "calibration_ddp_spawn"} if devices > 1 else {})}
        proc = run_cli(tiny_config(root, method="sink_wanda", pretrained="tiny-llada-moe", nsamples=5, trainer_args=trainer), tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append((json.loads((root / "pruned" / "results.json").read_text()), load_file(str(root / "pruned" / "masks.safetensors"))))
    (r1, m1), (r2, m2) = runs
    assert r1["moe"] == r2["moe"] and sum(r1["moe"]["expert_tokens"].values()) == 2 * 5 * 64 * 3 * 2
    assert m1.keys() == m2.keys()
    differ = sum((m1[k] != m2[k]).sum().item() for k in m1)
    assert differ <= 1e-3 * sum(m.numel() for m in m1.values())
