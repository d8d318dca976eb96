"""Fuzz: random token ids (mask, pad and special ids among them), right and left padding, all-padding rows,
length-1 rows, batch sizes 1..3 and batches of different lengths, through
  (a) AttentionMassProbe around a real forward of the embedded model, and
  (b) SinkStatsCallback + PruneCallback (sink-aware Wanda and SparseGPT) on a plain LightningModule that only
      follows pipeline/model/calibration.py.
Every case is drawn from a seeded torch.Generator, so a failure replays exactly from its seed."""
import copy
import json
import math

import lightning as L
import pytest
import torch
import transformers
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from callbacks.evaluate import EvaluateExportCallback
from callbacks.prune import PruneCallback
from callbacks.sink_stats import SinkStatsCallback
from tests.test_protocol import PlainModule
from pipeline.maths.attention import AttentionMassProbe
from pipeline.run.protocols import NoisedBatchHooks

SEEDS = [0, 1, 2, 3]
MAJOR = int(transformers.__version__.split(".")[0])
TIMESTEPS = [0.3, 1.0]


def _randint(g, low, high):
    """An int in [low, high] from g."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def random_batch(g, tok, vocab, batch, length, padding, allow_empty=True):
    """(input_ids, attention_mask) [batch, length]; padding in none/right/left; padded positions hold the pad
    id or, for some rows, random ids (padding must be invisible whatever it holds); with allow_empty a row
    may be all padding."""
    specials = [tok.mask_token_id, tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.unk_token_id]
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    pick = torch.rand(batch, length, generator=g)
    special = torch.tensor(specials)[torch.randint(0, len(specials), (batch, length), generator=g)]
    ids = torch.where(pick < 0.35, special, ids)  # the mask id among them, and pad ids inside real text
    mask = torch.ones(batch, length, dtype=torch.long)
    if padding != "none":
        for b in range(batch):
            real = _randint(g, 0 if allow_empty and length > 1 else 1, length)
            pad_slice = slice(real, None) if padding == "right" else slice(0, length - real)
            mask[b, pad_slice] = 0
            if _randint(g, 0, 1):
                ids[b, pad_slice] = tok.pad_token_id
    return ids, mask


def probe_cases(seed, tok, vocab):
    """Batches for one seed: a length-1 batch, then right-, left- and un-padded batches of random shapes."""
    g = torch.Generator().manual_seed(seed)
    cases = [random_batch(g, tok, vocab, _randint(g, 1, 3), 1, "none")]
    for padding in ("right", "left", "none", "right"):
        cases.append(random_batch(g, tok, vocab, _randint(g, 1, 3), _randint(g, 1, 24), padding))
    return cases


# --- (a) the probe around a real forward --------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_probe_on_random_inputs(seed, minilm):
    model, tok = minilm
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    for ids, am in probe_cases(seed, tok, model.config.vocab_size):
        batch, length = ids.shape
        valid = am.bool()
        n_real = valid.sum(dim=1).double()
        with torch.no_grad():
            plain = model(input_ids=ids, attention_mask=am).logits
            with AttentionMassProbe(per_layer=True, query_weights=valid) as probe:
                probed = model(input_ids=ids, attention_mask=am).logits
            with AttentionMassProbe(chunk_size=1) as unweighted:  # every query, one query row per chunk
                model(input_ids=ids, attention_mask=am)
        what = f"seed {seed}, shape {tuple(ids.shape)}, real tokens {n_real.tolist()}"
        assert torch.equal(plain, probed), what  # the probe never changes the model's output
        assert probe.calls == unweighted.calls == layers and len(probe.per_layer) == layers, what
        mass = probe.mass
        assert mass.shape == (batch, length) and mass.dtype == torch.float32, what
        assert torch.isfinite(mass).all() and (mass >= 0).all(), what
        # every real query's softmax row sums to 1, in every layer and head; padding queries weigh 0
        torch.testing.assert_close(mass.double().sum(dim=1), layers * heads * n_real, rtol=1e-5, atol=1e-3, msg=what)
        for layer_mass in probe.per_layer:
            torch.testing.assert_close(layer_mass.double().sum(dim=1), heads * n_real, rtol=1e-5, atol=1e-3, msg=what)
        # padded keys receive nothing from the rows that have a real token
        has_real = valid.any(dim=1)
        assert mass[has_real][~valid[has_real]].abs().sum() <= 1e-6, what
        assert (mass[~has_real] == 0).all(), what
        # without query weights all batch·length query rows count.  An all-padding row: transformers 4 hands BERT's
        # SDPA an additive mask of finite minima (the row attends uniformly: full mass); transformers 5 a boolean
        # mask hiding every key (SDPA outputs zeros there, and so does the probe: no mass)
        full = torch.full((batch,), float(layers * heads * length), dtype=torch.float64)
        expected = torch.where(has_real | (MAJOR < 5), full, torch.zeros_like(full))
        torch.testing.assert_close(unweighted.mass.double().sum(dim=1), expected, rtol=1e-5, atol=1e-3, msg=what)
        assert unweighted.mass[has_real][~valid[has_real]].abs().sum() <= 1e-6, what
        # chunking (1 row vs the default 128) changes nothing but rounding
        with torch.no_grad(), AttentionMassProbe(chunk_size=1, query_weights=valid) as chunked:
            model(input_ids=ids, attention_mask=am)
        torch.testing.assert_close(chunked.mass, mass, rtol=1e-5, atol=1e-4, msg=what)


# --- (b) both callbacks through the protocol on a plain LightningModule --------------------------------------

class Spy(Callback, NoisedBatchHooks):
    """Between SinkStatsCallback and PruneCallback: checks every noised batch's sink scores and attention
    mass, and PruneCallback's summed statistics just before it prunes (its epoch-end hook runs after ours)."""

    def __init__(self, prune, layers, heads):
        self.prune, self.layers, self.heads = prune, layers, heads
        self.batches, self.statistics = 0, {}

    def on_noised_batch(self, trainer, pl_module, nb):
        scores = nb.sink_scores
        what = f"samples {nb.sample_ids}, t={nb.t}, shape {tuple(nb.input_ids.shape)}"
        assert scores is not None and scores.shape == nb.input_ids.shape, what
        assert torch.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all(), what
        mass = nb.extras["attention_mass"]
        assert torch.isfinite(mass).all(), what
        if nb.attention_mask is None:
            n_real = torch.full((len(nb.sample_ids),), float(nb.input_ids.shape[1]), dtype=torch.float64)
        else:
            padding = nb.attention_mask == 0
            assert (scores[padding] == 0).all(), what  # padding is never a sink
            n_real = nb.attention_mask.sum(dim=1).double()
        torch.testing.assert_close(mass.double().sum(dim=1), self.layers * self.heads * n_real, rtol=1e-5, atol=1e-3, msg=what)
        self.batches += 1

    def on_train_epoch_end(self, trainer, pl_module):
        for name in self.prune.layers:
            total = self.prune.sums.total(self.prune.shared.key(name))  # q/k/v share q's statistic
            assert total is not None, name
            self.statistics[name] = (bool(torch.isfinite(total).all()),
                                     bool((total.diagonal() if total.dim() == 2 else total).min() >= 0))


def callback_batches(seed, tok, vocab):
    """Batches of different lengths (as a module with dynamic padding makes them), global sample indices."""
    g = torch.Generator().manual_seed(100 + seed)
    specs = [(1, "none"), (_randint(g, 2, 16), "right"), (_randint(g, 2, 16), "left"), (1, "right"), (_randint(g, 1, 16), "none")]
    batches, next_id = [], 0
    for length, padding in specs:
        size = _randint(g, 1, 3)
        ids, am = random_batch(g, tok, vocab, size, length, padding)
        batch = {"input_ids": ids, "index": torch.arange(next_id, next_id + size)}
        if padding != "none" or _randint(g, 0, 1):  # an attention mask of ones, or none at all
            batch["attention_mask"] = am
        batches.append(batch)
        next_id += size
    return batches


def _no_nan_constants(value):
    raise AssertionError(f"sinks.json holds {value}")


@pytest.mark.parametrize("method", ["sink_wanda", "sink_sparsegpt"])
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_callbacks_on_random_inputs(seed, method, minilm, tmp_path):
    model, tok = minilm
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    batches = callback_batches(seed, tok, model.config.vocab_size)
    sample_ids = [int(i) for b in batches for i in b["index"]]
    empty = {int(i) for b in batches if "attention_mask" in b for i, row in zip(b["index"], b["attention_mask"]) if not row.any()}

    module = PlainModule(copy.deepcopy(model), tok.mask_token_id, TIMESTEPS, seed=5)  # pruned in place; the fixture stays dense
    sinks = SinkStatsCallback(output_dir=str(tmp_path / "sinks"), heatmap=(seed == 0))
    prune = PruneCallback(method=method, sparsity=0.5)
    export = EvaluateExportCallback(output_dir=str(tmp_path / "pruned"), save_model=False, score=False, score_dense=False)
    spy = Spy(prune, layers, heads)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[sinks, spy, prune, export],
                        default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))

    assert spy.batches == len(batches) * len(TIMESTEPS)
    # every (sample, timestep) counted once for pruning; the sink summary describes the samples with a real token
    assert prune.seen == {(0, sid, step) for sid in sample_ids for step in range(len(TIMESTEPS))}
    assert sorted(sinks.records) == [(sid, step) for sid in sample_ids if sid not in empty for step in range(len(TIMESTEPS))]
    summary = json.loads((tmp_path / "sinks" / "sinks.json").read_text(), parse_constant=_no_nan_constants)
    assert summary["samples"] == len(sample_ids) - len(empty)
    assert summary["seqlen"] == max(b["input_ids"].shape[1] for b in batches)
    assert math.isfinite(summary["sink_position_variance"]) and summary["sink_position_variance"] >= 0
    assert 0 < summary["uniform_share"] <= 1
    for row in summary["timesteps"]:
        assert 0 < row["top1_share"] <= 1 + 1e-6 and 0 <= row["normalized_entropy"] <= 1 + 1e-6, row
        assert math.isfinite(row["mean_sinks_per_sample"]), row
    for heat in summary["mean_mass_by_timestep"]:
        assert len(heat) == summary["seqlen"] and all(v is None or 0 <= v <= 1 + 1e-9 for v in heat), heat
        assert any(v is not None for v in heat)
    if seed == 0:
        assert (tmp_path / "sinks" / "sink_heatmap.png").stat().st_size > 1000

    # statistics finite and non-negative for every layer; every pruned layer at exactly the target sparsity
    assert len(spy.statistics) == len(prune.layers) == 36
    assert all(finite and nonneg for finite, nonneg in spy.statistics.values()), spy.statistics
    masks = load_file(str(tmp_path / "pruned" / "masks.safetensors"))
    assert masks.keys() == prune.layers.keys()
    for name, layer in prune.layers.items():
        mask = masks[name].bool()
        assert mask.shape == layer.weight.shape and mask.float().mean().item() == 0.5, name
        assert (mask.sum(dim=1) == layer.in_features // 2).all(), name  # per output row
        assert (layer.weight[mask] == 0).all() and torch.isfinite(layer.weight).all(), name
