"""The callbacks plug into a plain LightningModule that follows pipeline/model/calibration.py (not DLMModule)."""
import copy
import json

import lightning as L
import torch
from safetensors.torch import load_file

from pipeline.model.calibration import dispatch_noised_batch, noised_batches
from callbacks.evaluate import EvaluateExportCallback
from callbacks.prune import PruneCallback
from callbacks.sink_stats import SinkStatsCallback
from pipeline.model.data import CalibrationData


class PlainModule(L.LightningModule):
    """Only the protocol: `model`, `mask_token_id`, and noised batches handed to the callbacks."""

    def __init__(self, model, mask_token_id, timesteps, seed=3):
        super().__init__()
        self.model, self.mask_token_id, self.timesteps, self.seed = model, mask_token_id, timesteps, seed
        self.model.requires_grad_(False)
        self.automatic_optimization = False

    def configure_optimizers(self):
        return None

    def training_step(self, batch, batch_idx):
        self.model.eval()
        with torch.no_grad():
            for nb in noised_batches(batch, self.timesteps, self.mask_token_id, seed=self.seed):
                dispatch_noised_batch(self.trainer, self, nb)


def test_callbacks_on_a_plain_module(tmp_path, minilm):
    model, tok = minilm
    model = copy.deepcopy(model)  # pruned in place below; the session fixture stays dense
    module = PlainModule(model, tok.mask_token_id, [0.25, 0.5, 1.0])
    dm = CalibrationData(tokenizer="minilm-dlm", nsamples=5, seqlen=48, batch_size=2, heldout_samples=2)
    sinks = SinkStatsCallback(output_dir=str(tmp_path / "sinks"))
    prune = PruneCallback(method="sink_wanda", sparsity=0.5)
    export = EvaluateExportCallback(output_dir=str(tmp_path / "pruned"), save_model=False, score=False, score_dense=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[sinks, prune, export],
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    # accumulation over 3 batches x 3 timesteps: every (sample, timestep) recorded once
    assert sorted(sinks.records) == [(s, t) for s in range(5) for t in range(3)]
    summary = json.loads((tmp_path / "sinks" / "sinks.json").read_text())
    assert [row["t"] for row in summary["timesteps"]] == [0.25, 0.5, 1.0]
    assert all(row["samples"] == 5 for row in summary["timesteps"])
    assert (tmp_path / "sinks" / "sink_heatmap.png").stat().st_size > 1000
    assert len(prune.seen) == 15
    masks = load_file(str(tmp_path / "pruned" / "masks.safetensors"))
    assert len(masks) == 36 and all(m.float().mean().item() == 0.5 for m in masks.values())
