"""Reads of tensor values into Python during calibration, per noised batch.  On a GPU each one waits for the device to
finish everything queued before it, and the device then idles while Python queues the next work: the per-layer
finiteness checks of the statistics once made one such wait per layer and sample.  On the CPU the reads themselves
are counted (every read that a GPU run would make is made here too)."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from callbacks.layers import FiniteChecks
from callbacks.prune import PruneCallback
from callbacks.sink_stats import SinkStatsCallback
from pipeline.model.data import CalibrationData
from pipeline.model.module import DLMModule

READS = ("__bool__", "item", "tolist", "__int__", "__float__", "cpu", "numpy")


class Reads:
    """Counts tensor reads into Python while one of the wrapped hooks runs, per hook."""

    def __init__(self, monkeypatch):
        self.active, self.counts = None, {}
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                if self.active is not None:
                    self.counts[self.active] = self.counts.get(self.active, 0) + 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def watch(self, monkeypatch, cls, hook: str) -> None:
        original = getattr(cls, hook)

        def watched(cb, *args, **kwargs):
            self.active = hook
            try:
                return original(cb, *args, **kwargs)
            finally:
                self.active = None

        monkeypatch.setattr(cls, hook, watched)


@pytest.mark.parametrize("method", ["sink_wanda", "sink_sparsegpt"])
def test_one_read_per_batch(tmp_path, monkeypatch, method):
    """tiny-llada (4 blocks, 7 targeted layers each; the q/k/v and gate/up inputs shared), 3 windows x 2
    timesteps: SinkStatsCallback reads the mass's finiteness once per batch, PruneCallback its statistics' once."""
    reads = Reads(monkeypatch)
    reads.watch(monkeypatch, SinkStatsCallback, "on_noised_batch_start")
    reads.watch(monkeypatch, PruneCallback, "on_noised_batch")
    windows = torch.randint(4, 4096, (3, 32), generator=torch.Generator().manual_seed(5))
    module = DLMModule(pretrained="tiny-llada", timesteps=2, seed=0)
    prune = PruneCallback(method=method, sparsity=0.5, reduction_slots=4)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[SinkStatsCallback(record=False, heatmap=False), prune])
    trainer.fit(module, datamodule=CalibrationData.from_windows(windows))
    assert len(prune.masks) == 28 and all(m.any() for m in prune.masks.values())
    batches = 3 * 2
    assert reads.counts == {"on_noised_batch_start": batches, "on_noised_batch": batches}, reads.counts


def test_finite_checks_name_the_first_nonfinite_statistic():
    checks = FiniteChecks()
    values = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("inf")])}
    for sample, name in enumerate(values):
        checks.note(torch.isfinite(values[name]).all(), name, sample, 0.25)
    with pytest.raises(FloatingPointError, match=r"NaN/Inf in the input activations of b \(sample 1, t=0.25\)"):
        checks.verify()
    checks.note(torch.tensor(True), "a", 0, 0.5)
    checks.verify()  # (verify empties the batch's checks: the failed ones are gone)
    with pytest.raises(FloatingPointError, match="of d "):
        checks.note(False, "d", 3, 0.5)  # a plain bool is checked at once
