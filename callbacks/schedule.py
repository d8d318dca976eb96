"""The reference flavour's calibration schedule: each sample's sink scores averaged over the timesteps (s̄),
collected in a first epoch, then clean (un-noised) inputs carrying s̄ in the layer-sequential block epochs."""
from __future__ import annotations

import torch

from callbacks.reduction import gather_records
from pipeline.model.calibration import NoisedBatch


class MeanSinkScores:
    """sample id -> [Σ_t s_t (float32 [L]), number of timesteps], summed in the timesteps' order (as the reference)."""

    def __init__(self):
        self.sums: dict[int, list] = {}

    def add(self, nb: NoisedBatch, seen: set, method: str) -> None:
        if nb.sink_scores is None:
            raise RuntimeError(f"prune method={method}: no sink scores on the batch; list SinkStatsCallback before PruneCallback")
        for b, sid in enumerate(nb.sample_ids):
            if sid < 0 or (0, sid, nb.step) in seen:
                continue
            scores = nb.sink_scores[b].detach().float().cpu()
            if sid in self.sums:
                self.sums[sid][0] = self.sums[sid][0] + scores
                self.sums[sid][1] += 1
            else:
                self.sums[sid] = [scores, 1]
            seen.add((0, sid, nb.step))

    def gather(self) -> None:
        """Every rank gets every sample's s̄ (collective)."""
        self.sums = {int(k): v for k, v in gather_records(self.sums).items()}

    def clean_batch(self, nb: NoisedBatch, with_scores: bool, flavor: str) -> NoisedBatch:
        """The clean text x_0 of the batch, carrying s̄ when the pruner weights by it."""
        scores = None
        if with_scores:
            missing = [sid for sid in nb.sample_ids if sid >= 0 and sid not in self.sums]
            if missing:
                raise RuntimeError(f"prune flavor={flavor}: no mean sink scores for samples {missing[:4]}; "
                                   "the first (scores) epoch must see every calibration sample")
            length = nb.clean_ids.shape[1]
            scores = torch.stack([self.sums[sid][0] / self.sums[sid][1] if sid >= 0 else torch.zeros(length)
                                  for sid in nb.sample_ids]).to(nb.clean_ids.device)
        return NoisedBatch(nb.clean_ids, nb.clean_ids, torch.zeros_like(nb.masked), 0.0, nb.step, nb.sample_ids,
                           nb.attention_mask, sink_scores=scores)
