"""PruneCallback end to end on minilm-dlm: exact sparsity, untouched embeddings/head, determinism,
single-pass == two-pass, zero sink scores == plain method, a saved model that reloads to the same score."""
import json

import pytest
import torch
from safetensors.torch import load_file

from callbacks.evaluate import EvaluateExportCallback
from callbacks.sink_stats import SinkStatsCallback
from tests.runs import run_inprocess, tiny_config


class ZeroSinkStats(SinkStatsCallback):
    """Publishes sink scores of exactly 0: sink-aware statistics must then equal the plain ones."""

    def on_noised_batch_start(self, trainer, pl_module, nb):
        super().on_noised_batch_start(trainer, pl_module, nb)
        nb.sink_scores = torch.zeros_like(nb.sink_scores)


def _run(tmp_path, name, **kw):
    root = tmp_path / name
    code, err = run_inprocess(tiny_config(root, **kw), tmp_path)
    assert code == 0, err[-3000:]
    results = json.loads((root / "pruned" / "results.json").read_text())
    return root, load_file(str(root / "pruned" / "masks.safetensors")), results


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method,mode", [("sink_wanda", "oneshot"), ("sink_sparsegpt", "oneshot"), ("sink_sparsegpt", "sequential")])
def test_single_pass_equals_two_pass(tmp_path, method, mode):
    _, two, r2 = _run(tmp_path, "two", method=method, prune_args={"single_pass": False, "mode": mode})
    _, one, r1 = _run(tmp_path, "one", method=method, prune_args={"single_pass": True, "mode": mode})
    assert _same(one, two)
    assert r1["pruned"]["heldout"] == r2["pruned"]["heldout"]


def test_zero_sink_scores_equal_plain_wanda(tmp_path):
    _, plain, _ = _run(tmp_path, "plain", method="wanda")
    config = tiny_config(tmp_path / "zero", method="sink_wanda")
    config["trainer"]["callbacks"][0]["class_path"] = "tests.test_prune_pipeline.ZeroSinkStats"
    code, err = run_inprocess(config, tmp_path)
    assert code == 0, err[-3000:]
    zero = load_file(str(tmp_path / "zero" / "pruned" / "masks.safetensors"))
    assert _same(plain, zero)
    _, sink, _ = _run(tmp_path, "sink", method="sink_wanda")
    assert not _same(plain, sink)  # real sink scores do change the masks


def test_sparsity_exact_embeddings_untouched_and_reload(tmp_path, minilm):
    root, masks, results = _run(tmp_path, "run", method="sink_wanda", sparsity=0.6)
    report = results["sparsity_report"]
    assert report["meets_target"] and len(report["layers"]) == 36
    for row in report["layers"]:
        assert row["rows_below_target"] == 0 and abs(row["sparsity"] - int(row["shape"][1] * 0.6) / row["shape"][1]) < 1e-9
    dense_model, _ = minilm
    pruned = load_file(str(root / "pruned" / "model" / "model.safetensors"))
    dense = dense_model.state_dict()
    for name in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight", "cls.predictions.bias",
                 "cls.predictions.transform.dense.weight"):
        assert torch.equal(pruned[name], dense[name]), name
    # the saved folder reloads through the same loader and scores the same held-out perplexity
    from pipeline.model.loading import load_dlm

    reloaded, _ = load_dlm(str(root / "pruned" / "model"))
    for name, mask in masks.items():
        weight = reloaded.get_submodule(name).weight
        assert torch.equal(weight[mask.bool()], torch.zeros_like(weight[mask.bool()]))


@pytest.mark.parametrize("pretrained,method,mode", [("minilm-dlm", "wanda", "oneshot"),
                                                     ("tiny-llada", "sink_sparsegpt", "sequential")])
def test_reload_scores_the_same(tmp_path, pretrained, method, mode):
    # tiny-llada is LLaDA's remote-code layout: the saved folder must carry the .py files and reload
    # through from_pretrained(..., trust_remote_code=True) like GSAI-ML/LLaDA-8B-Base
    root, _, results = _run(tmp_path, "run", method=method, pretrained=pretrained, prune_args={"mode": mode})
    from lightning import Trainer

    from pipeline.model.data import CalibrationData
    from pipeline.model.module import DLMModule

    saved = root / "pruned" / "model"
    if pretrained == "tiny-llada":
        assert {"modeling_llada.py", "configuration_llada.py"} <= {p.name for p in saved.iterdir()}
        assert results["sparsity_report"]["meets_target"]
    module = DLMModule(pretrained=str(saved), heldout_timesteps=2)
    evaluate = EvaluateExportCallback()
    dm = CalibrationData(tokenizer=str(saved), nsamples=6, seqlen=64, batch_size=2, heldout_samples=4)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[evaluate])
    trainer.fit(module, datamodule=dm)
    assert evaluate.dense["heldout"] == results["pruned"]["heldout"]


@pytest.mark.parametrize("n_m", ["2:4", "4:8"])
def test_n_m_groups_exact(tmp_path, n_m):
    _, masks, results = _run(tmp_path, "nm", method="sink_wanda", n_m=n_m)
    n, m = map(int, n_m.split(":"))
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, m).sum(dim=-1)
        assert torch.all(groups == n), name
    assert results["sparsity_report"]["meets_target"]


def test_deterministic_and_sequential_differs(tmp_path):
    _, a, ra = _run(tmp_path, "a", method="sink_sparsegpt")
    _, b, rb = _run(tmp_path, "b", method="sink_sparsegpt")
    assert _same(a, b) and ra["pruned"]["heldout"] == rb["pruned"]["heldout"]
    _, seq, rs = _run(tmp_path, "seq", method="sink_sparsegpt", prune_args={"mode": "sequential"})
    assert rs["mode"] == "sequential" and rs["sparsity_report"]["meets_target"]
    assert not _same(a, seq)  # later blocks saw the already-pruned earlier blocks
    assert len({p[0] for p in rs["calibrated_pairs"]}) == 6  # one calibration epoch per block
